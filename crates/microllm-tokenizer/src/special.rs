//! Splitting text at special-token occurrences, exactly as llama.cpp's `tokenizer_st_partition`.
//!
//! llama.cpp takes the special tokens (control, user-defined, unknown) longest first and, for
//! each in turn, splits every remaining text fragment at all its non-overlapping occurrences,
//! left to right. This is not the same as one leftmost-longest scan (HF's added tokens), so it
//! is reproduced here as is. An Aho-Corasick pass over the whole text first finds which special
//! tokens occur at all, so a 262k vocabulary with 6k control tokens costs one scan, not 6k.

use aho_corasick::{AhoCorasick, MatchKind};

/// A piece of the input: text still to be tokenized, or a special token already recognised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fragment<'a> {
    Text(&'a str),
    Token(u32),
}

/// The special tokens of a vocabulary, in llama.cpp's matching order.
pub(crate) struct SpecialTokens {
    /// Token ids, longest text first (ties: lower id first).
    ids: Vec<u32>,
    /// Their texts, same order.
    texts: Vec<String>,
    /// Control/unknown tokens are matched only with `parse_special`; user-defined always.
    needs_parse_special: Vec<bool>,
    /// Over `texts`, to find which occur in a given input. `None` if it could not be built.
    finder: Option<AhoCorasick>,
}

impl SpecialTokens {
    /// `candidates`: (id, text, needs_parse_special). Empty texts are ignored.
    pub fn new(candidates: impl IntoIterator<Item = (u32, String, bool)>) -> Self {
        let mut all: Vec<(u32, String, bool)> = candidates
            .into_iter()
            .filter(|(_, t, _)| !t.is_empty())
            .collect();
        all.sort_by(|a, b| b.1.len().cmp(&a.1.len()).then(a.0.cmp(&b.0)));
        let ids = all.iter().map(|a| a.0).collect();
        let needs_parse_special = all.iter().map(|a| a.2).collect();
        let texts: Vec<String> = all.into_iter().map(|a| a.1).collect();
        let finder = if texts.is_empty() {
            None
        } else {
            AhoCorasick::builder()
                .match_kind(MatchKind::Standard)
                .build(&texts)
                .ok()
        };
        SpecialTokens {
            ids,
            texts,
            needs_parse_special,
            finder,
        }
    }

    /// Splits `text` into fragments. Text fragments are never empty.
    pub fn partition<'a>(&self, text: &'a str, parse_special: bool) -> Vec<Fragment<'a>> {
        if text.is_empty() {
            return Vec::new();
        }
        let mut frags = vec![Fragment::Text(text)];
        if self.texts.is_empty() {
            return frags;
        }
        // Which special tokens occur anywhere in the text (a fragment is a substring of it).
        let mut present = vec![false; self.texts.len()];
        match &self.finder {
            Some(ac) => {
                for m in ac.find_overlapping_iter(text) {
                    present[m.pattern().as_usize()] = true;
                }
            }
            None => {
                for (p, t) in present.iter_mut().zip(&self.texts) {
                    *p = text.contains(t.as_str());
                }
            }
        }
        for (i, t) in self.texts.iter().enumerate() {
            if !present[i] || (!parse_special && self.needs_parse_special[i]) {
                continue;
            }
            let id = self.ids[i];
            let mut next = Vec::with_capacity(frags.len() + 2);
            for f in frags {
                match f {
                    Fragment::Text(s) => {
                        let mut last = 0;
                        for (pos, _) in s.match_indices(t.as_str()) {
                            if pos > last {
                                next.push(Fragment::Text(&s[last..pos]));
                            }
                            next.push(Fragment::Token(id));
                            last = pos + t.len();
                        }
                        if last < s.len() {
                            next.push(Fragment::Text(&s[last..]));
                        }
                    }
                    tok => next.push(tok),
                }
            }
            frags = next;
        }
        frags
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longest_first_then_left_to_right() {
        let sp = SpecialTokens::new([
            (10, "<a>".to_owned(), true),
            (11, "<a><a>".to_owned(), true),
            (12, "\n".to_owned(), false),
        ]);
        let f = sp.partition("x<a><a><a>\ny", true);
        assert_eq!(
            f,
            vec![
                Fragment::Text("x"),
                Fragment::Token(11),
                Fragment::Token(10),
                Fragment::Token(12),
                Fragment::Text("y"),
            ]
        );
        // Without parse_special only the user-defined "\n" is split out.
        let f = sp.partition("x<a>\ny", false);
        assert_eq!(
            f,
            vec![
                Fragment::Text("x<a>"),
                Fragment::Token(12),
                Fragment::Text("y")
            ]
        );
        assert!(sp.partition("", true).is_empty());
    }
}

//! SentencePiece-style BPE over scores (`tokenizer.ggml.model = "llama"`), llama.cpp's algorithm.
//!
//! The text (spaces already replaced by U+2581) is split into UTF-8 characters; then, as long as
//! possible, the adjacent pair whose concatenation is a vocabulary entry with the highest score
//! is merged (ties: the leftmost). Symbols that are not vocabulary entries at the end (only single
//! characters can be) become byte tokens `<0xXX>`. A doubly linked list of symbols plus a max-heap
//! of candidate pairs with lazy invalidation makes this O(n log n).

use std::cmp::Ordering;
use std::collections::BinaryHeap;

/// A run of the input text: `start..start+len` bytes, linked to its neighbours.
#[derive(Clone, Copy)]
struct Symbol {
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

/// A candidate merge of `left` and `right`, whose texts had `size` bytes together when queued.
struct Bigram {
    score: f32,
    left: usize,
    right: usize,
    size: usize,
}

impl PartialEq for Bigram {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Bigram {}
impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Bigram {
    /// Max-heap order: higher score first, then the leftmost.
    fn cmp(&self, other: &Self) -> Ordering {
        self.score
            .total_cmp(&other.score)
            .then_with(|| other.left.cmp(&self.left))
    }
}

/// What the merge loop needs from the vocabulary.
pub(crate) struct SpmVocab<'a> {
    pub token_to_id: &'a crate::FastMap<Box<str>, u32>,
    pub scores: &'a [f32],
    /// Token for each byte value (byte fallback), if the vocabulary has one.
    pub byte_tokens: &'a [Option<u32>; 256],
    pub unk_id: Option<u32>,
}

impl SpmVocab<'_> {
    fn score(&self, id: u32) -> f32 {
        self.scores.get(id as usize).copied().unwrap_or(0.0)
    }

    fn try_add(
        &self,
        text: &str,
        syms: &[Symbol],
        l: Option<usize>,
        r: Option<usize>,
        heap: &mut BinaryHeap<Bigram>,
    ) {
        let (Some(left), Some(right)) = (l, r) else {
            return;
        };
        let (a, b) = (syms[left], syms[right]);
        let piece = &text[a.start..b.start + b.len];
        if let Some(&id) = self.token_to_id.get(piece) {
            heap.push(Bigram {
                score: self.score(id),
                left,
                right,
                size: piece.len(),
            });
        }
    }

    /// Appends the ids of `text` (whitespace already escaped) to `out`.
    pub fn encode(&self, text: &str, out: &mut Vec<u32>) {
        let mut syms: Vec<Symbol> = Vec::with_capacity(text.len());
        for (i, (start, c)) in text.char_indices().enumerate() {
            syms.push(Symbol {
                start,
                len: c.len_utf8(),
                prev: i.checked_sub(1),
                next: None,
            });
            if i > 0 {
                syms[i - 1].next = Some(i);
            }
        }
        if syms.is_empty() {
            return;
        }

        let mut heap = BinaryHeap::with_capacity(syms.len());
        for i in 1..syms.len() {
            self.try_add(text, &syms, Some(i - 1), Some(i), &mut heap);
        }
        while let Some(bg) = heap.pop() {
            let (l, r) = (syms[bg.left], syms[bg.right]);
            // Stale: one side was merged away, or grew since this pair was queued.
            if l.len == 0 || r.len == 0 || l.len + r.len != bg.size {
                continue;
            }
            syms[bg.left].len += r.len;
            syms[bg.right].len = 0;
            syms[bg.left].next = r.next;
            if let Some(n) = r.next {
                syms[n].prev = Some(bg.left);
            }
            self.try_add(text, &syms, syms[bg.left].prev, Some(bg.left), &mut heap);
            self.try_add(text, &syms, Some(bg.left), syms[bg.left].next, &mut heap);
        }

        let mut cur = Some(0);
        while let Some(i) = cur {
            let s = syms[i];
            let piece = &text[s.start..s.start + s.len];
            match self.token_to_id.get(piece) {
                Some(&id) => out.push(id),
                None => {
                    for b in piece.bytes() {
                        if let Some(id) = self.byte_tokens[b as usize].or(self.unk_id) {
                            out.push(id);
                        }
                    }
                }
            }
            cur = s.next;
        }
    }
}

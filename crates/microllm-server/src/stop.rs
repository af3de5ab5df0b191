//! Stop strings found across token boundaries: text that could still be the start of a stop
//! string is held back until the next pieces decide, so a stop string is never streamed.

/// Feeds decoded text in, lets out only text that cannot be part of a stop string.
#[derive(Debug, Default)]
pub(crate) struct StopMatcher {
    stops: Vec<String>,
    /// Decoded but not yet released.
    held: String,
}

/// What one [`StopMatcher::push`] released.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Released {
    /// Text safe to send.
    pub text: String,
    /// A stop string was found: `text` ends just before it and generation must end.
    pub stopped: bool,
}

impl StopMatcher {
    /// Empty stop strings are ignored (they would match everywhere).
    pub fn new(stops: impl IntoIterator<Item = String>) -> Self {
        StopMatcher {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            held: String::new(),
        }
    }

    pub fn push(&mut self, piece: &str) -> Released {
        self.held.push_str(piece);
        if self.stops.is_empty() {
            return Released {
                text: std::mem::take(&mut self.held),
                stopped: false,
            };
        }
        // The earliest occurrence of any stop string ends the text.
        let first = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min();
        if let Some(pos) = first {
            let text = self.held[..pos].to_string();
            self.held.clear();
            return Released {
                text,
                stopped: true,
            };
        }
        // Hold back the longest tail that is a proper prefix of some stop string.
        let keep = self.longest_partial_tail();
        let cut = self.held.len() - keep;
        let text = self.held[..cut].to_string();
        self.held.drain(..cut);
        Released {
            text,
            stopped: false,
        }
    }

    /// Releases what is held (generation ended for another reason).
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    fn longest_partial_tail(&self) -> usize {
        let h = self.held.as_str();
        let mut best = 0;
        for s in &self.stops {
            // Tails of `h` shorter than `s`, longest first, on char boundaries.
            let max = (s.len() - 1).min(h.len());
            for k in (best + 1..=max).rev() {
                let start = h.len() - k;
                if h.is_char_boundary(start) && s.starts_with(&h[start..]) {
                    best = k;
                    break;
                }
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()));
        let mut out = String::new();
        for p in pieces {
            let r = m.push(p);
            out.push_str(&r.text);
            if r.stopped {
                return (out, true);
            }
        }
        out.push_str(&m.finish());
        (out, false)
    }

    #[test]
    fn no_stops_passes_everything_through() {
        assert_eq!(run(&[], &["a", "b"]), ("ab".into(), false));
        assert_eq!(run(&[""], &["a", "b"]), ("ab".into(), false));
    }

    #[test]
    fn stop_inside_one_piece_is_trimmed() {
        assert_eq!(run(&["END"], &["abcENDxyz"]), ("abc".into(), true));
    }

    #[test]
    fn stop_across_pieces_is_never_released() {
        let mut m = StopMatcher::new(["\n\nUser:".to_string()]);
        assert_eq!(m.push("Hi there.").text, "Hi there.");
        let r = m.push("\n");
        assert_eq!(r.text, "");
        assert!(!r.stopped);
        assert_eq!(m.push("\nUs").text, "");
        let r = m.push("er: next");
        assert_eq!(
            r,
            Released {
                text: String::new(),
                stopped: true
            }
        );
    }

    #[test]
    fn a_false_start_is_released_later() {
        assert_eq!(run(&["abc"], &["xa", "b", "d"]), ("xabd".into(), false));
        assert_eq!(run(&["abc"], &["xa", "b"]), ("xab".into(), false));
    }

    #[test]
    fn earliest_of_several_stops_wins() {
        assert_eq!(run(&["zz", "b"], &["aab", "zz"]), ("aa".into(), true));
        assert_eq!(run(&["bc", "cd"], &["ab", "cd"]), ("a".into(), true));
    }

    #[test]
    fn multibyte_text_is_cut_on_char_boundaries() {
        assert_eq!(run(&["é!"], &["café", " ok"]), ("café ok".into(), false));
        assert_eq!(run(&["é!"], &["café", "!"]), ("caf".into(), true));
        assert_eq!(run(&["😀x"], &["a😀", "y"]), ("a😀y".into(), false));
    }
}

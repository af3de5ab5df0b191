//! [`StreamDecoder`]: token-by-token text that never splits a UTF-8 character.

use crate::Tokenizer;

/// Turns a stream of token ids into text, emitting only complete UTF-8 characters.
///
/// A character can span tokens (byte-fallback tokens, byte-level BPE pieces of an emoji);
/// its bytes wait here until the character is complete. Bytes that can never form a valid
/// character are emitted as U+FFFD as soon as that is certain.
#[derive(Debug, Default, Clone)]
pub struct StreamDecoder {
    pending: Vec<u8>,
}

impl StreamDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one token; returns the text that became complete, if any.
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Option<String> {
        self.push_bytes(tok.token_bytes(id))
    }

    /// Adds raw bytes; returns the text that became complete, if any.
    pub fn push_bytes(&mut self, bytes: &[u8]) -> Option<String> {
        self.pending.extend_from_slice(bytes);
        let mut out = String::new();
        let mut start = 0;
        loop {
            match std::str::from_utf8(&self.pending[start..]) {
                Ok(s) => {
                    out.push_str(s);
                    start = self.pending.len();
                    break;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    // Valid by construction: `valid_up_to` bytes were just checked.
                    out.push_str(&String::from_utf8_lossy(
                        &self.pending[start..start + valid],
                    ));
                    start += valid;
                    match e.error_len() {
                        // Invalid bytes: no later byte can fix them.
                        Some(n) => {
                            out.push('\u{fffd}');
                            start += n;
                        }
                        // An incomplete character at the end: wait for more.
                        None => break,
                    }
                }
            }
        }
        self.pending.drain(..start);
        (!out.is_empty()).then_some(out)
    }

    /// Bytes held back, waiting for the rest of their character.
    pub fn pending(&self) -> &[u8] {
        &self.pending
    }

    /// Flushes what is held back (an incomplete character becomes U+FFFD).
    pub fn finish(&mut self) -> String {
        let s = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emoji_split_across_pushes() {
        let emoji = "😀".as_bytes(); // F0 9F 98 80
        let mut d = StreamDecoder::new();
        assert_eq!(d.push_bytes(b"hi "), Some("hi ".to_owned()));
        assert_eq!(d.push_bytes(&emoji[..1]), None);
        assert_eq!(d.push_bytes(&emoji[1..3]), None);
        assert_eq!(d.pending(), &emoji[..3]);
        assert_eq!(d.push_bytes(&[emoji[3], b'!']), Some("😀!".to_owned()));
        assert_eq!(d.finish(), "");
    }

    #[test]
    fn invalid_bytes_do_not_block_the_stream() {
        let mut d = StreamDecoder::new();
        assert_eq!(d.push_bytes(&[0xff, b'a']), Some("\u{fffd}a".to_owned()));
        // A lead byte followed by a non-continuation byte is invalid at once.
        assert_eq!(d.push_bytes(&[0xe2, b'b']), Some("\u{fffd}b".to_owned()));
        assert_eq!(d.push_bytes(&[0xe2, 0x82]), None);
        assert_eq!(d.finish(), "\u{fffd}");
        assert!(d.pending().is_empty());
    }
}

//! Model names: `NAME[:TAG]`, validated so a name can never escape the store directory.

use crate::error::StoreError;

/// Longest accepted name or tag, in bytes.
pub const MAX_NAME_LEN: usize = 128;

/// A validated `NAME[:TAG]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelRef {
    pub name: String,
    pub tag: Option<String>,
}

impl ModelRef {
    /// Parses and validates `NAME[:TAG]`.
    ///
    /// Allowed: `[A-Za-z0-9._-]` in each part, one `:` between name and tag, at most
    /// [`MAX_NAME_LEN`] bytes each, not starting with `.` or `-`, no `..`, no Windows device
    /// names. Everything else (`/`, `\`, NUL, absolute paths, spaces, ...) is refused.
    pub fn parse(s: &str) -> Result<Self, StoreError> {
        let bad = |reason| StoreError::InvalidName {
            name: s.to_string(),
            reason,
        };
        if s.contains('\0') {
            return Err(bad("it contains a NUL byte"));
        }
        if s.contains('/') || s.contains('\\') {
            return Err(bad("it contains a path separator"));
        }
        let (name, tag) = match s.split_once(':') {
            Some((n, t)) => {
                if t.contains(':') {
                    return Err(bad("it has more than one ':'"));
                }
                (n, Some(t))
            }
            None => (s, None),
        };
        validate_component(name).map_err(bad)?;
        if let Some(t) = tag {
            validate_component(t).map_err(bad)?;
        }
        Ok(Self {
            name: name.to_string(),
            tag: tag.map(str::to_string),
        })
    }

    /// `name:tag` with the given default tag filled in.
    pub fn display_with(&self, default_tag: &str) -> String {
        format!(
            "{}:{}",
            self.name,
            self.tag.as_deref().unwrap_or(default_tag)
        )
    }
}

/// Checks one name or tag component; the error is the reason.
pub(crate) fn validate_component(c: &str) -> Result<(), &'static str> {
    if c.is_empty() {
        return Err("the name or tag is empty");
    }
    if c.len() > MAX_NAME_LEN {
        return Err("it is longer than 128 bytes");
    }
    if !c
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err("it contains a character outside A-Z a-z 0-9 . _ -");
    }
    if c.contains("..") {
        return Err("it contains '..'");
    }
    if c.starts_with('.') || c.starts_with('-') {
        return Err("it starts with '.' or '-'");
    }
    let stem = c.split('.').next().unwrap_or(c).to_ascii_lowercase();
    let device = matches!(stem.as_str(), "con" | "prn" | "aux" | "nul")
        || ((stem.starts_with("com") || stem.starts_with("lpt"))
            && stem.len() == 4
            && stem.as_bytes()[3].is_ascii_digit());
    if device {
        return Err("it is a reserved device name on Windows");
    }
    Ok(())
}

/// Turns arbitrary text (a file stem, a package version) into a valid component, or None.
pub(crate) fn sanitize_component(s: &str) -> Option<String> {
    let mut out: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    while out.contains("..") {
        out = out.replace("..", ".");
    }
    let out = out.trim_start_matches(['.', '-']).to_string();
    let out: String = out.chars().take(MAX_NAME_LEN).collect();
    validate_component(&out).ok().map(|_| out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sanitize() {
        assert_eq!(sanitize_component("1.0+cpu").as_deref(), Some("1.0_cpu"));
        assert_eq!(
            sanitize_component("../My Model").as_deref(),
            Some("_My_Model")
        );
        assert_eq!(sanitize_component("..."), None);
        assert_eq!(sanitize_component("con"), None);
    }
}

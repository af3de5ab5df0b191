//! Optional ed25519 signatures on manifests.
//!
//! A signature covers a fixed text naming the model and its file:
//! `microllm-manifest-v1\nname=NAME\ntag=TAG\nsize=SIZE\nsha256=HEX\n`. Together with the
//! blob's own digest check this says "the holder of this key published this exact file under
//! this name". The source URL and the informational fields are not covered (they are
//! re-derivable and may legitimately differ between stores). Keys are text files: the secret
//! key file holds `microllm-ed25519-secret-key <64 hex>` (the 32-byte seed), the public one
//! `microllm-ed25519-public-key <64 hex>`; a public key may also be given inline as 64 hex.

use crate::error::StoreError;
use crate::store::{Manifest, Store};
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

const SECRET_PREFIX: &str = "microllm-ed25519-secret-key";
const PUBLIC_PREFIX: &str = "microllm-ed25519-public-key";

/// A signature stored in a manifest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestSignature {
    /// The signer's public key, hex.
    pub key: String,
    /// ed25519 signature of [`signed_message`], hex.
    pub sig: String,
}

/// The outcome of checking a manifest's signature against a key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum SignatureStatus {
    /// No key was given.
    NotChecked,
    Valid,
    /// The manifest has no signature.
    Unsigned,
    /// Signed, but by another key (hex).
    OtherKey {
        key: String,
    },
    /// Signed by this key, but the signature does not match the manifest.
    Invalid,
}

/// The bytes a manifest's signature covers.
pub fn signed_message(m: &Manifest) -> Vec<u8> {
    format!(
        "microllm-manifest-v1\nname={}\ntag={}\nsize={}\nsha256={}\n",
        m.name, m.tag, m.size, m.sha256
    )
    .into_bytes()
}

/// Signs `m` with `key`.
pub fn sign_manifest(m: &Manifest, key: &SigningKey) -> ManifestSignature {
    ManifestSignature {
        key: hex::encode(key.verifying_key().as_bytes()),
        sig: hex::encode(key.sign(&signed_message(m)).to_bytes()),
    }
}

/// Checks `m`'s signature against `key`.
pub fn check_signature(m: &Manifest, key: &VerifyingKey) -> SignatureStatus {
    let Some(s) = &m.signature else {
        return SignatureStatus::Unsigned;
    };
    if !s.key.eq_ignore_ascii_case(&hex::encode(key.as_bytes())) {
        return SignatureStatus::OtherKey { key: s.key.clone() };
    }
    let Some(sig) = hex::decode(&s.sig)
        .ok()
        .and_then(|b| <[u8; 64]>::try_from(b).ok())
    else {
        return SignatureStatus::Invalid;
    };
    match key.verify(&signed_message(m), &Signature::from_bytes(&sig)) {
        Ok(()) => SignatureStatus::Valid,
        Err(_) => SignatureStatus::Invalid,
    }
}

/// Ok if `m` carries a valid signature by `key`, else an error saying what is wrong.
pub(crate) fn require_valid(m: &Manifest, key: &VerifyingKey) -> Result<(), StoreError> {
    let reason = match check_signature(m, key) {
        SignatureStatus::Valid | SignatureStatus::NotChecked => return Ok(()),
        SignatureStatus::Unsigned => "the manifest is not signed".to_string(),
        SignatureStatus::OtherKey { key } => {
            format!("the manifest is signed by another key ({key})")
        }
        SignatureStatus::Invalid => {
            "the signature does not match the manifest (it was altered after signing)".into()
        }
    };
    Err(StoreError::Signature {
        name: m.display_name(),
        reason,
    })
}

fn parse_key_text(text: &str, prefix: &str) -> Option<[u8; 32]> {
    let t = text.trim();
    let hex_part = t.strip_prefix(prefix).map(str::trim).unwrap_or(t);
    hex::decode(hex_part)
        .ok()
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
}

/// Reads a secret key file written by [`generate_key`].
pub fn read_signing_key(path: &Path) -> Result<SigningKey, StoreError> {
    let bad = |reason: String| StoreError::BadKey {
        what: path.display().to_string(),
        reason,
    };
    let text = fs::read_to_string(path).map_err(|e| bad(format!("cannot read it ({e})")))?;
    if text.trim_start().starts_with(PUBLIC_PREFIX) {
        return Err(bad(
            "this is a public key; signing needs the secret key file".into(),
        ));
    }
    parse_key_text(&text, SECRET_PREFIX)
        .map(|seed| SigningKey::from_bytes(&seed))
        .ok_or_else(|| bad(format!("expected `{SECRET_PREFIX} <64 hex digits>`")))
}

/// A public key: 64 hex digits inline, or a file holding them (a public key file, or a
/// secret key file, whose public half is used).
pub fn read_verifying_key(spec: &str) -> Result<VerifyingKey, StoreError> {
    let bad = |reason: String| StoreError::BadKey {
        what: spec.to_string(),
        reason,
    };
    let (text, from_file) = match fs::read_to_string(spec) {
        Ok(t) => (t, true),
        Err(_) if spec.len() == 64 => (spec.to_string(), false),
        Err(e) => return Err(bad(format!("cannot read it ({e})"))),
    };
    if from_file && text.trim_start().starts_with(SECRET_PREFIX) {
        return read_signing_key(Path::new(spec)).map(|k| k.verifying_key());
    }
    let bytes = parse_key_text(&text, PUBLIC_PREFIX)
        .ok_or_else(|| bad(format!("expected `{PUBLIC_PREFIX} <64 hex digits>`")))?;
    VerifyingKey::from_bytes(&bytes).map_err(|e| bad(format!("not a valid ed25519 key ({e})")))
}

/// Makes a new key pair: the secret key in `path` (mode 0600, refused if it exists), the
/// public key in `path.pub`. Returns the public key file and the key.
pub fn generate_key(path: &Path) -> Result<(PathBuf, VerifyingKey), StoreError> {
    let bad = |reason: String| StoreError::BadKey {
        what: path.display().to_string(),
        reason,
    };
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| bad(format!("no OS randomness ({e})")))?;
    let key = SigningKey::from_bytes(&seed);
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts
        .open(path)
        .map_err(|e| bad(format!("cannot create it ({e}); it must not exist yet")))?;
    writeln!(f, "{SECRET_PREFIX} {}", hex::encode(seed))
        .and_then(|_| f.sync_all())
        .map_err(|e| bad(format!("cannot write it ({e})")))?;
    let mut pub_path = path.as_os_str().to_owned();
    pub_path.push(".pub");
    let pub_path = PathBuf::from(pub_path);
    let vk = key.verifying_key();
    fs::write(
        &pub_path,
        format!("{PUBLIC_PREFIX} {}\n", hex::encode(vk.as_bytes())),
    )
    .map_err(|e| bad(format!("cannot write {} ({e})", pub_path.display())))?;
    Ok((pub_path, vk))
}

impl Store {
    /// Signs the manifest of stored `model` with `key` (replacing any signature).
    pub fn sign(&self, model: &str, key: &SigningKey) -> Result<Manifest, StoreError> {
        let m = self.manifest(model)?;
        self.with_name_lock(&m.name, &m.tag, || {
            // Re-read under the lock: sign what is stored now.
            let mut m =
                self.read_manifest(&m.name, &m.tag)?
                    .ok_or_else(|| StoreError::NotPulled {
                        name: model.to_string(),
                    })?;
            m.signature = Some(sign_manifest(&m, key));
            self.save_manifest(&m)?;
            Ok(m)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> Manifest {
        Manifest {
            schema: 2,
            name: "m".into(),
            tag: "t".into(),
            source: "file:/x".into(),
            size: 5,
            sha256: "a".repeat(64),
            added: "x".into(),
            info: None,
            signature: None,
        }
    }

    #[test]
    fn sign_and_check() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        let (pub_path, vk) = generate_key(&p).unwrap();
        assert!(generate_key(&p).is_err(), "must not overwrite a key");
        let sk = read_signing_key(&p).unwrap();
        assert_eq!(sk.verifying_key(), vk);
        assert_eq!(read_verifying_key(pub_path.to_str().unwrap()).unwrap(), vk);
        assert_eq!(read_verifying_key(p.to_str().unwrap()).unwrap(), vk);
        assert_eq!(read_verifying_key(&hex::encode(vk.as_bytes())).unwrap(), vk);
        assert!(read_signing_key(&pub_path).is_err());
        assert!(read_verifying_key("nope").is_err());

        let mut m = manifest();
        assert_eq!(check_signature(&m, &vk), SignatureStatus::Unsigned);
        m.signature = Some(sign_manifest(&m, &sk));
        assert_eq!(check_signature(&m, &vk), SignatureStatus::Valid);
        require_valid(&m, &vk).unwrap();
        // Informational fields are not covered.
        m.source = "hf:a/b/c.gguf".into();
        assert_eq!(check_signature(&m, &vk), SignatureStatus::Valid);
        // The digest, size and name are.
        let mut t = m.clone();
        t.sha256 = "b".repeat(64);
        assert_eq!(check_signature(&t, &vk), SignatureStatus::Invalid);
        let mut t = m.clone();
        t.tag = "other".into();
        assert_eq!(check_signature(&t, &vk), SignatureStatus::Invalid);
        assert!(require_valid(&t, &vk)
            .unwrap_err()
            .to_string()
            .contains("altered"));
        let other = SigningKey::from_bytes(&[7; 32]).verifying_key();
        assert!(matches!(
            check_signature(&m, &other),
            SignatureStatus::OtherKey { .. }
        ));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&p).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}

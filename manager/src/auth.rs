//! Bearer tokens and random identifiers.
//!
//! The manager never stores a token, only its SHA-256, so a copy of the database does not
//! let anyone act as a delegate or as the admin. Tokens carry a prefix (`dlg_`, `adm_`) so
//! the manager can tell an operator who pasted the wrong kind of token what went wrong.

use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Prefix of delegate tokens (`dlg_` + 64 hex digits).
pub const DELEGATE_PREFIX: &str = "dlg_";
/// Prefix of the admin token (`adm_` + 64 hex digits).
pub const ADMIN_PREFIX: &str = "adm_";

/// `n` random bytes as lowercase hex, from the thread's CSPRNG (reseeded from the OS).
pub fn random_hex(n: usize) -> String {
    let mut buf = vec![0u8; n];
    rand::rng().fill_bytes(&mut buf);
    hex::encode(buf)
}

/// A fresh delegate token: 32 random bytes.
pub fn new_delegate_token() -> String {
    format!("{DELEGATE_PREFIX}{}", random_hex(32))
}

/// A fresh admin token: 32 random bytes.
pub fn new_admin_token() -> String {
    format!("{ADMIN_PREFIX}{}", random_hex(32))
}

/// What the database keeps of a token.
pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Is `token` the one whose [`hash_token`] is `hash`? Compared in constant time, so the
/// time an answer takes says nothing about how much of a guess was right.
pub fn token_matches(token: &str, hash: &str) -> bool {
    hash_token(token).as_bytes().ct_eq(hash.as_bytes()).into()
}

/// The token of an `Authorization: Bearer ...` header value, if it is one.
pub fn bearer(header: &str) -> Option<&str> {
    let (scheme, token) = header.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_have_prefix_and_64_hex_digits() {
        let t = new_delegate_token();
        assert!(t.starts_with("dlg_"));
        assert_eq!(t.len(), 4 + 64);
        assert!(t[4..].bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(t, new_delegate_token());
        assert!(new_admin_token().starts_with("adm_"));
    }

    #[test]
    fn hash_is_sha256_hex() {
        assert_eq!(
            hash_token("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn a_token_matches_only_its_own_hash() {
        let t = new_admin_token();
        let h = hash_token(&t);
        assert!(token_matches(&t, &h));
        // Same length, last digit changed.
        let mut wrong = t.clone();
        let last = if wrong.ends_with('0') { "1" } else { "0" };
        wrong.replace_range(wrong.len() - 1.., last);
        assert_eq!(wrong.len(), t.len());
        assert!(!token_matches(&wrong, &h));
        assert!(!token_matches("", &h));
        assert!(!token_matches(&t, ""));
    }

    #[test]
    fn bearer_parses_scheme_case_insensitively() {
        assert_eq!(bearer("Bearer dlg_x"), Some("dlg_x"));
        assert_eq!(bearer("bearer  adm_y "), Some("adm_y"));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("Bearer "), None);
    }
}

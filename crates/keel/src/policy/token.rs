//! Reconnect tokens: what a client presents in `resume` to get its session back.
//!
//! A token is `k1.<claims>.<mac>`: the claims (client_id, session_id, generation,
//! expiry) as base64url JSON, and an HMAC-SHA256 over `k1.<claims>` with the key
//! `reconnect_secret`, compared in constant time. Any node with the same key can
//! check a token, so resume works without sticky sessions; the generation makes a
//! token good for one resume (the session remembers the generation it expects).
//!
//! A token is not a credential: it restores a session, it does not authenticate a
//! client (where auth is on, the resuming connection must authenticate as the same
//! client_id). This module must never log a token or the key.

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::error::{Error, ErrorKind, Result};

const VERSION: &str = "k1";

/// What a valid reconnect token says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReconnectClaims {
    /// The client the session belongs to.
    #[serde(rename = "c")]
    pub client_id: String,
    /// The session (a UUID).
    #[serde(rename = "s")]
    pub session_id: String,
    /// Which resume of the session this token is for; each resume moves it on by one.
    #[serde(rename = "g")]
    pub generation: u64,
    /// Expiry, milliseconds since the Unix epoch.
    #[serde(rename = "e")]
    pub expires_at_ms: u64,
    /// Whether the session's connection had authenticated with a credential: then
    /// only a connection authenticated as the same client may resume it.
    #[serde(rename = "a", default, skip_serializing_if = "std::ops::Not::not")]
    pub authenticated: bool,
}

/// Signs and checks reconnect tokens with one key.
#[derive(Clone)]
pub(crate) struct TokenSigner {
    /// The keyed MAC, cloned per use (keying once saves a hash of the key per token).
    mac: Hmac<Sha256>,
}

impl TokenSigner {
    /// A signer with `secret`, or a random 32-byte key when `None`.
    pub(crate) fn new(secret: Option<&str>) -> Self {
        let key: Vec<u8> = match secret {
            Some(s) => s.as_bytes().to_vec(),
            None => (0..32).map(|_| rand::random::<u8>()).collect(),
        };
        TokenSigner {
            // HMAC takes keys of any length; this cannot fail.
            mac: <Hmac<Sha256> as Mac>::new_from_slice(&key)
                .unwrap_or_else(|_| unreachable!("HMAC accepts any key length")),
        }
    }

    /// The token for `claims`.
    pub(crate) fn sign(&self, claims: &ReconnectClaims) -> String {
        let body = serde_json::to_vec(claims).unwrap_or_default();
        let mut token = String::with_capacity(3 + body.len() * 4 / 3 + 48);
        token.push_str(VERSION);
        token.push('.');
        B64.encode_string(&body, &mut token);
        let mut mac = self.mac.clone();
        mac.update(token.as_bytes());
        let tag = mac.finalize().into_bytes();
        token.push('.');
        B64.encode_string(tag, &mut token);
        token
    }

    /// The claims of `token` if its signature is good and it has not expired at
    /// `now_ms` (Unix milliseconds): [`ErrorKind::InvalidToken`] for anything
    /// malformed or forged, [`ErrorKind::TokenExpired`] for a good one past expiry.
    pub(crate) fn verify(&self, token: &str, now_ms: u64) -> Result<ReconnectClaims> {
        let claims = self.verify_signature(token)?;
        if claims.expires_at_ms < now_ms {
            return Err(Error::new(
                ErrorKind::TokenExpired,
                "reconnect token expired",
            ));
        }
        Ok(claims)
    }

    /// The claims of `token` if its signature is good, expired or not.
    pub(crate) fn verify_signature(&self, token: &str) -> Result<ReconnectClaims> {
        let invalid = || Error::new(ErrorKind::InvalidToken, "invalid reconnect token");
        let (signed, tag) = token.rsplit_once('.').ok_or_else(invalid)?;
        let (version, body) = signed.split_once('.').ok_or_else(invalid)?;
        if version != VERSION {
            return Err(invalid());
        }
        let tag = B64.decode(tag).map_err(|_| invalid())?;
        let mut mac = self.mac.clone();
        mac.update(signed.as_bytes());
        // Constant-time comparison.
        mac.verify_slice(&tag).map_err(|_| invalid())?;
        let body = B64.decode(body).map_err(|_| invalid())?;
        serde_json::from_slice(&body).map_err(|_| invalid())
    }
}

/// Milliseconds since the Unix epoch, now.
pub(crate) use crate::clock::unix_ms;

#[cfg(test)]
mod tests {
    use super::*;

    fn claims() -> ReconnectClaims {
        ReconnectClaims {
            client_id: "alice".into(),
            session_id: "6f0c2f5e-7d4b-4b6e-9a59-0e6e2c3b7a11".into(),
            generation: 3,
            expires_at_ms: 2_000,
            authenticated: false,
        }
    }

    #[test]
    fn round_trip() {
        let s = TokenSigner::new(Some("0123456789abcdef"));
        let t = s.sign(&claims());
        assert!(t.starts_with("k1."));
        assert_eq!(s.verify(&t, 1_000).unwrap(), claims());
    }

    #[test]
    fn expired_is_told_apart_from_forged() {
        let s = TokenSigner::new(Some("0123456789abcdef"));
        let t = s.sign(&claims());
        assert_eq!(
            s.verify(&t, 3_000).unwrap_err().kind(),
            &ErrorKind::TokenExpired
        );
    }

    #[test]
    fn tampering_is_refused() {
        let s = TokenSigner::new(Some("0123456789abcdef"));
        let t = s.sign(&claims());
        // Another client_id with the old signature.
        let mut other = claims();
        other.client_id = "mallory".into();
        let forged_body = B64.encode(serde_json::to_vec(&other).unwrap());
        let parts: Vec<&str> = t.split('.').collect();
        let forged = format!("k1.{forged_body}.{}", parts[2]);
        // One flipped character anywhere.
        let mut flipped = t.clone().into_bytes();
        flipped[5] ^= 1;
        let flipped = String::from_utf8(flipped).unwrap();
        for bad in [
            forged.as_str(),
            flipped.as_str(),
            "",
            "k1",
            "k1..",
            "k2.e30.AAAA",
            &t[..t.len() - 2],
        ] {
            assert_eq!(
                s.verify(bad, 0).unwrap_err().kind(),
                &ErrorKind::InvalidToken,
                "{bad}"
            );
        }
        // Another key.
        let other_node = TokenSigner::new(Some("fedcba9876543210"));
        assert_eq!(
            other_node.verify(&t, 0).unwrap_err().kind(),
            &ErrorKind::InvalidToken
        );
        // A generated key is not the configured one.
        assert!(TokenSigner::new(None).verify(&t, 0).is_err());
    }
}

//! Who a connection is: JWTs (HS256 with a shared secret, RS256 / ES256 with a
//! public key), one-time tickets, and the [`Identity`] either of them yields.
//!
//! An [`Authenticator`] checks a JWT's signature with the key of the algorithm's
//! family only (an HMAC key never verifies an RSA-signed header and a public key is
//! never used as an HMAC secret, which rules out algorithm confusion), requires
//! `sub` and `exp`, and enforces `exp` with no leeway. `alg: none` is not an
//! algorithm it knows. [`Tickets`] are short-lived random strings, each redeemable
//! once on any node, also under concurrent attempts (they live in the broker,
//! whose take is atomic).
//!
//! What it must not do: log or echo a token, a ticket or a key (error details
//! name what was wrong, never the credential), or read anything but the key file
//! named in the config.

use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine as _;
use jsonwebtoken::{AlgorithmFamily, DecodingKey, Validation};
use serde::{Deserialize, Serialize};

use crate::broker::Broker;
use crate::config::{Config, ConfigError};
use crate::error::{Error, ErrorKind, Result};

pub use crate::conn::Identity;

#[derive(Deserialize)]
struct JwtClaims {
    sub: String,
    exp: u64,
    #[serde(default)]
    info: serde_json::Value,
    #[serde(default)]
    channels: Option<Vec<String>>,
}

/// Checks JWTs with the configured keys.
#[derive(Clone)]
pub struct Authenticator {
    /// For HS256/384/512 (`auth.jwt_secret`).
    hmac: Option<DecodingKey>,
    /// For RS* / PS* or ES* (`auth.jwt_public_key_file`), with its family.
    public: Option<DecodingKey>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the keys.
        f.debug_struct("Authenticator")
            .field("hmac", &self.hmac.is_some())
            .field("public", &self.public.as_ref().map(|k| k.family()))
            .finish()
    }
}

impl Authenticator {
    /// The authenticator `config` describes, or `None` when no JWT key is
    /// configured. Reads `auth_jwt_public_key_file` (PEM, RSA or EC); a missing
    /// or unreadable key is an error naming the option.
    pub fn from_config(config: &Config) -> std::result::Result<Option<Self>, ConfigError> {
        let hmac = match &config.auth_jwt_secret {
            Some(s) => Some(
                DecodingKey::from_secret(s.as_bytes()).map_err(|e| ConfigError {
                    option: "auth_jwt_secret".into(),
                    message: e.to_string(),
                })?,
            ),
            None => None,
        };
        let public = match &config.auth_jwt_public_key_file {
            Some(path) => {
                let err = |message: String| ConfigError {
                    option: "auth_jwt_public_key_file".into(),
                    message,
                };
                let pem = std::fs::read(path)
                    .map_err(|e| err(format!("cannot read {}: {e}", path.display())))?;
                let key = DecodingKey::from_rsa_pem(&pem)
                    .or_else(|_| DecodingKey::from_ec_pem(&pem))
                    .map_err(|_| {
                        err(format!(
                            "{} is not an RSA or EC public key in PEM",
                            path.display()
                        ))
                    })?;
                Some(key)
            }
            None => None,
        };
        Ok((hmac.is_some() || public.is_some()).then_some(Authenticator { hmac, public }))
    }

    /// An authenticator with an HMAC secret only (for applications that build
    /// their own config in code).
    pub fn with_secret(secret: &[u8]) -> Result<Self> {
        let hmac = DecodingKey::from_secret(secret)
            .map_err(|e| Error::new(ErrorKind::InvalidArgument, e.to_string()))?;
        Ok(Authenticator {
            hmac: Some(hmac),
            public: None,
        })
    }

    /// The identity `token` proves: [`ErrorKind::TokenExpired`] past its `exp`,
    /// [`ErrorKind::InvalidToken`] for anything else (malformed, unsigned, wrong
    /// signature, an algorithm no configured key is for, no `sub` or `exp`).
    pub fn verify(&self, token: &str) -> Result<Identity> {
        let invalid = |why: &str| Error::new(ErrorKind::InvalidToken, why.to_string());
        let header = jsonwebtoken::decode_header(token).map_err(|_| invalid("malformed token"))?;
        let key = match header.alg.family() {
            AlgorithmFamily::Hmac => self.hmac.as_ref(),
            AlgorithmFamily::Rsa | AlgorithmFamily::Ec => self
                .public
                .as_ref()
                .filter(|k| k.family() == header.alg.family()),
            _ => None,
        }
        .ok_or_else(|| invalid("token algorithm not accepted"))?;
        let mut v = Validation::new(header.alg);
        v.algorithms = vec![header.alg];
        v.leeway = 0;
        v.set_required_spec_claims(&["sub", "exp"]);
        let data = jsonwebtoken::decode::<JwtClaims>(token, key, &v).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind as K;
            match e.kind() {
                K::ExpiredSignature => Error::new(ErrorKind::TokenExpired, "token expired"),
                K::InvalidSignature => invalid("bad token signature"),
                K::MissingRequiredClaim(c) => invalid(&format!("token has no `{c}` claim")),
                _ => invalid("invalid token"),
            }
        })?;
        let c = data.claims;
        if c.sub.is_empty() || c.sub.len() > 255 || c.sub.chars().any(char::is_control) {
            return Err(invalid("token `sub` must be 1 to 255 printable characters"));
        }
        Ok(Identity {
            client_id: c.sub,
            info: c.info,
            channels: c.channels,
            expires_at: Some(c.exp),
        })
    }
}

/// One-time tickets: `POST /api/ticket` issues one, the upgrade redeems it.
///
/// Kept in the [`Broker`], so a ticket issued through one node is redeemed on
/// any, once: the broker's take is atomic. The stored value carries the
/// ticket's own expiry, and the broker keeps it a little longer than that, so a
/// late redeem is told `TokenExpired`, not "unknown". How many may be
/// outstanding at once is the broker's bound.
pub struct Tickets {
    broker: Arc<dyn Broker>,
    ttl: Duration,
}

/// How long past its expiry a ticket is still kept, to say "expired" rather than
/// "unknown". Short: it counts against the broker's bound on tickets held, so at
/// 100 000 and the default 30 s TTL the gateway issues up to 2,500 a second.
const EXPIRED_GRACE: Duration = Duration::from_secs(10);

#[derive(Serialize, Deserialize)]
struct Stored {
    identity: Identity,
    /// Expiry, milliseconds since the Unix epoch.
    exp_ms: u64,
}

impl std::fmt::Debug for Tickets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tickets")
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl Tickets {
    /// Tickets that live `ttl`, kept in `broker`.
    pub fn new(broker: Arc<dyn Broker>, ttl: Duration) -> Self {
        Tickets { broker, ttl }
    }

    /// How long a ticket lives.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Issues a ticket for `identity`. [`ErrorKind::LimitExceeded`] when the
    /// broker holds as many tickets as it may.
    pub async fn issue(&self, identity: Identity) -> Result<String> {
        let bytes: [u8; 32] = rand::random();
        let ticket = B64.encode(bytes);
        let stored = Stored {
            identity,
            exp_ms: crate::clock::unix_ms() + self.ttl.as_millis() as u64,
        };
        let value = serde_json::to_string(&stored)
            .map_err(|e| Error::new(ErrorKind::InvalidArgument, e.to_string()))?;
        self.broker
            .ticket_put(&ticket, &value, self.ttl + EXPIRED_GRACE)
            .await?;
        Ok(ticket)
    }

    /// The identity of `ticket`, which is spent: [`ErrorKind::InvalidToken`] if it
    /// is unknown or already used, [`ErrorKind::TokenExpired`] past its TTL.
    pub async fn redeem(&self, ticket: &str) -> Result<Identity> {
        let unknown = || Error::new(ErrorKind::InvalidToken, "unknown or already used ticket");
        let value = self.broker.ticket_take(ticket).await?.ok_or_else(unknown)?;
        let stored: Stored = serde_json::from_str(&value).map_err(|_| unknown())?;
        if stored.exp_ms <= crate::clock::unix_ms() {
            return Err(Error::new(ErrorKind::TokenExpired, "ticket expired"));
        }
        Ok(stored.identity)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};

    fn now() -> u64 {
        jsonwebtoken::get_current_timestamp()
    }

    fn hs(secret: &str, claims: serde_json::Value) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()).unwrap(),
        )
        .unwrap()
    }

    #[test]
    fn hs256_claims_become_the_identity() {
        let a = Authenticator::with_secret(b"0123456789abcdef0123").unwrap();
        let t = hs(
            "0123456789abcdef0123",
            serde_json::json!({"sub": "alice", "exp": now() + 60, "info": {"name": "A"}, "channels": ["chat:1"]}),
        );
        let id = a.verify(&t).unwrap();
        assert_eq!(id.client_id, "alice");
        assert_eq!(id.info["name"], "A");
        assert_eq!(id.channels, Some(vec!["chat:1".to_string()]));
    }

    #[test]
    fn expired_forged_unsigned_and_incomplete_tokens_are_refused() {
        let a = Authenticator::with_secret(b"0123456789abcdef0123").unwrap();
        let expired = hs(
            "0123456789abcdef0123",
            serde_json::json!({"sub": "a", "exp": now() - 5}),
        );
        assert_eq!(
            a.verify(&expired).unwrap_err().kind(),
            &ErrorKind::TokenExpired
        );
        let wrong = hs(
            "another-secret-entirely",
            serde_json::json!({"sub": "a", "exp": now() + 60}),
        );
        assert_eq!(
            a.verify(&wrong).unwrap_err().kind(),
            &ErrorKind::InvalidToken
        );
        let no_exp = hs("0123456789abcdef0123", serde_json::json!({"sub": "a"}));
        assert_eq!(
            a.verify(&no_exp).unwrap_err().kind(),
            &ErrorKind::InvalidToken
        );
        // alg: none, hand-made.
        let none = format!(
            "{}.{}.",
            B64.encode(br#"{"alg":"none","typ":"JWT"}"#),
            B64.encode(format!(r#"{{"sub":"a","exp":{}}}"#, now() + 60))
        );
        assert_eq!(
            a.verify(&none).unwrap_err().kind(),
            &ErrorKind::InvalidToken
        );
        for junk in ["", "a.b", "a.b.c", "...."] {
            assert_eq!(a.verify(junk).unwrap_err().kind(), &ErrorKind::InvalidToken);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_ticket_is_redeemed_once_even_under_concurrent_attempts() {
        let limits = crate::broker::BrokerLimits {
            max_tickets: 10,
            ..Default::default()
        };
        let broker = Arc::new(crate::MemoryBroker::new(1).with_limits(limits));
        let t = Arc::new(Tickets::new(broker, Duration::from_secs(30)));
        let id = Identity {
            client_id: "c".into(),
            info: serde_json::Value::Null,
            channels: None,
            expires_at: None,
        };
        let ticket = t.issue(id.clone()).await.unwrap();
        let tries: Vec<_> = (0..8)
            .map(|_| {
                let (t, k) = (t.clone(), ticket.clone());
                tokio::spawn(async move { t.redeem(&k).await.is_ok() as usize })
            })
            .collect();
        let mut wins = 0;
        for h in tries {
            wins += h.await.unwrap();
        }
        assert_eq!(wins, 1);
        assert_eq!(
            t.redeem(&ticket).await.unwrap_err().kind(),
            &ErrorKind::InvalidToken
        );
        // Bounded.
        for _ in 0..10 {
            t.issue(id.clone()).await.unwrap();
        }
        assert_eq!(
            t.issue(id).await.unwrap_err().kind(),
            &ErrorKind::LimitExceeded
        );
    }
}

//! Token authentication: `find_user {username, token}` with an HS256 JWT (RFC 7519) signed by
//! the operator's application with `AUTH_SECRET`. The jsonwebtoken crate checks the signature
//! (ring's constant-time HMAC verification) and the time claims; this module only decides what
//! the server requires: `sub` equal to the username (both in Unicode NFC, as names are compared
//! everywhere), `exp` present and not passed, `nbf` and `iat` honoured when present, 30 s leeway
//! for clocks that disagree. `aud` is ignored unless `AUTH_AUDIENCE` is set; then it must be
//! present and name that audience (a string, or an array containing it).

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use unicode_normalization::UnicodeNormalization;

/// Clock disagreement tolerated on `exp`, `nbf` and `iat`, in seconds.
pub const LEEWAY_SECONDS: u64 = 30;
/// Lifetime of a token from `noomnim token` unless `--ttl` says otherwise.
pub const DEFAULT_TTL_SECONDS: u64 = 3600;

/// The shared secret. Its `Debug` never shows the bytes, so a logged configuration cannot leak it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl Secret {
    pub fn new(bytes: Vec<u8>) -> Secret {
        Secret(bytes)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The key bytes (for signing; never printed).
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret(<{} bytes, redacted>)", self.0.len())
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    iat: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    nbf: Option<u64>,
    /// Checked by the crate against `AUTH_AUDIENCE`; kept here so minted tokens carry it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    aud: Option<serde_json::Value>,
}

/// Checks and mints tokens for one secret.
pub struct Authenticator {
    decoding: DecodingKey,
    encoding: EncodingKey,
    validation: Validation,
    audience: Option<String>,
}

impl fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Authenticator(HS256)")
    }
}

fn now_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

impl Authenticator {
    /// Checks tokens signed with `secret`; with `audience`, only tokens whose `aud` names it.
    pub fn new(secret: &Secret, audience: Option<&str>) -> Authenticator {
        // Only HS256: a token naming `none` or any other algorithm is refused before its
        // signature is looked at (no algorithm confusion).
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = LEEWAY_SECONDS;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        match audience {
            Some(audience) => {
                validation.set_audience(&[audience]);
                validation.set_required_spec_claims(&["exp", "sub", "aud"]);
            }
            None => {
                // Tokens minted for several services often carry an `aud`; without a configured
                // audience there is nothing to compare it with, so it is not held against them.
                validation.validate_aud = false;
                validation.set_required_spec_claims(&["exp", "sub"]);
            }
        }
        Authenticator {
            decoding: DecodingKey::from_secret(&secret.0),
            encoding: EncodingKey::from_secret(&secret.0),
            validation,
            audience: audience.map(str::to_string),
        }
    }

    /// Whether `token` lets its bearer log in as `username`. Every failure is the same `false`:
    /// the client is told nothing about why.
    pub fn admits(&self, token: &str, username: &str) -> bool {
        let Ok(data) = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
        else {
            return false;
        };
        let claims = data.claims;
        // `iat` in the future (beyond the leeway) is a token from a broken or hostile minter.
        if claims
            .iat
            .is_some_and(|iat| iat > now_seconds() + LEEWAY_SECONDS)
        {
            return false;
        }
        // The username arrives in NFC (ops/fields.rs); a minter may have written `sub` in
        // another form of the same text.
        claims.sub.nfc().eq(username.chars())
    }

    /// A token for `username`, valid from now for `ttl_seconds`.
    pub fn mint(&self, username: &str, ttl_seconds: u64) -> Result<String, String> {
        let now = now_seconds();
        let claims = Claims {
            sub: username.to_string(),
            exp: now.saturating_add(ttl_seconds),
            iat: Some(now),
            nbf: None,
            aud: self.audience.clone().map(serde_json::Value::String),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map_err(|e| format!("cannot sign a token: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn authenticator(secret: &str) -> Authenticator {
        Authenticator::new(&Secret::new(secret.as_bytes().to_vec()), None)
    }

    fn signed(auth: &Authenticator, claims: &serde_json::Value) -> String {
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &auth.encoding)
            .expect("encode")
    }

    #[test]
    fn sub_is_compared_in_nfc_and_aud_only_when_configured() {
        let exp = now_seconds() + 600;
        let open = authenticator("a-test-secret-of-some-length-0123456");
        let decomposed = signed(
            &open,
            &serde_json::json!({"sub": "jose\u{301}", "exp": exp}),
        );
        assert!(open.admits(&decomposed, "jos\u{e9}"));
        let with_aud = signed(
            &open,
            &serde_json::json!({"sub": "al", "exp": exp, "aud": "x"}),
        );
        assert!(
            open.admits(&with_aud, "al"),
            "aud is ignored when none is configured"
        );

        let secret = Secret::new(b"a-test-secret-of-some-length-0123456".to_vec());
        let strict = Authenticator::new(&secret, Some("chat"));
        let ok = signed(
            &strict,
            &serde_json::json!({"sub": "al", "exp": exp, "aud": "chat"}),
        );
        let listed = signed(
            &strict,
            &serde_json::json!({"sub": "al", "exp": exp, "aud": ["mail", "chat"]}),
        );
        let other = signed(
            &strict,
            &serde_json::json!({"sub": "al", "exp": exp, "aud": "mail"}),
        );
        let none = signed(&strict, &serde_json::json!({"sub": "al", "exp": exp}));
        assert!(strict.admits(&ok, "al"));
        assert!(strict.admits(&listed, "al"));
        assert!(!strict.admits(&other, "al"));
        assert!(!strict.admits(&none, "al"));
    }

    #[test]
    fn a_minted_token_admits_its_user_only() {
        let auth = authenticator("a-test-secret-of-some-length");
        let token = auth.mint("alice", 60).expect("mint");
        assert!(auth.admits(&token, "alice"));
        assert!(!auth.admits(&token, "bob"));
        assert!(!authenticator("another-secret").admits(&token, "alice"));
    }

    #[test]
    fn expired_and_unsigned_tokens_are_refused() {
        let auth = authenticator("a-test-secret-of-some-length");
        let old = Claims {
            sub: "alice".into(),
            exp: now_seconds() - LEEWAY_SECONDS - 5,
            iat: None,
            nbf: None,
            aud: None,
        };
        let expired = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &old, &auth.encoding)
            .expect("encode");
        assert!(!auth.admits(&expired, "alice"));
        // alg "none": header {"alg":"none","typ":"JWT"}, valid claims, empty signature.
        let none = format!(
            "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{}.",
            base64_url(&format!(
                r#"{{"sub":"alice","exp":{}}}"#,
                now_seconds() + 600
            ))
        );
        assert!(!auth.admits(&none, "alice"));
        assert!(!auth.admits("not a token", "alice"));
        assert!(!auth.admits("", "alice"));
    }

    fn base64_url(text: &str) -> String {
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let bytes = text.as_bytes();
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let n = chunk
                .iter()
                .enumerate()
                .fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
            for i in 0..=chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            }
        }
        out
    }

    #[test]
    fn the_secret_is_never_printed() {
        let secret = Secret::new(b"hunter2-hunter2".to_vec());
        assert!(!format!("{secret:?}").contains("hunter2"));
    }
}

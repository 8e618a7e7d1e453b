//! Tokens and the admin secret.
//!
//! A token is an HS256 JWT naming the user and platform, with an expiry and
//! the revocation generation current when it was issued. Logout bumps the
//! generation, which revokes every earlier token of that user and platform
//! at once, with no list of revoked tokens to keep.

use std::sync::Arc;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use imflow_stages::model::{now_ms, ImError};
use imflow_stages::store::Directory;

use crate::error::Error;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Claims {
    sub: String,
    plt: u8,
    gen: u64,
    iat: i64,
    exp: i64,
}

/// Who a valid token speaks for.
#[derive(Debug, Clone)]
pub struct Identity {
    pub user_id: Arc<str>,
    pub platform: u8,
}

pub struct Auth {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    ttl_secs: i64,
    admin_secret: String,
    directory: Arc<dyn Directory>,
}

impl Auth {
    /// `signing_key` signs tokens; it is kept in the store so tokens survive
    /// restarts (created at random on first run).
    pub async fn new(
        directory: Arc<dyn Directory>,
        admin_secret: String,
        ttl_secs: i64,
    ) -> Result<Self, Error> {
        let mut fresh = [0u8; 32];
        getrandom::fill(&mut fresh).map_err(|e| Error::Random(e.to_string()))?;
        let hex: String = fresh.iter().map(|b| format!("{b:02x}")).collect();
        let key = directory
            .setting_or_insert("token_signing_key", &hex)
            .await?;
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 0;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Ok(Auth {
            encoding: EncodingKey::from_secret(key.as_bytes()),
            decoding: DecodingKey::from_secret(key.as_bytes()),
            validation,
            ttl_secs,
            admin_secret,
            directory,
        })
    }

    pub fn is_admin(&self, secret: Option<&str>) -> bool {
        use subtle::ConstantTimeEq;
        // Constant time, so timing does not leak the secret.
        secret.is_some_and(|given| bool::from(given.as_bytes().ct_eq(self.admin_secret.as_bytes())))
    }

    /// Issue a token; returns it and its expiry (ms since the epoch).
    pub async fn issue(&self, user_id: &str, platform: u8) -> Result<(String, i64), ImError> {
        let now = now_ms() / 1000;
        let claims = Claims {
            sub: user_id.to_string(),
            plt: platform,
            gen: self.directory.token_generation(user_id, platform).await?,
            iat: now,
            exp: now + self.ttl_secs,
        };
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map_err(|e| ImError::unavailable(format!("cannot sign token: {e}")))?;
        Ok((token, claims.exp * 1000))
    }

    /// Check a token: signature, expiry, revocation, and that the user exists.
    pub async fn verify(&self, token: &str) -> Result<Identity, ImError> {
        let unauthorized = |m: &str| ImError::new(imflow_stages::model::ErrorCode::Unauthorized, m);
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => unauthorized("token expired"),
                _ => unauthorized("invalid token"),
            })?;
        let c = data.claims;
        if c.gen < self.directory.token_generation(&c.sub, c.plt).await? {
            return Err(unauthorized("token revoked"));
        }
        if !self.directory.user_exists(&c.sub).await? {
            return Err(unauthorized("unknown user"));
        }
        Ok(Identity {
            user_id: c.sub.into(),
            platform: c.plt,
        })
    }
}

/// The token of a request: `Authorization: Bearer …`, else `?token=…`.
pub fn token_from(authorization: Option<&str>, query: Option<&str>) -> Option<String> {
    if let Some(t) = authorization.and_then(|h| h.strip_prefix("Bearer ")) {
        return Some(t.trim().to_string());
    }
    query?
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == "token")
        .map(|(_, v)| percent_decode(v))
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h * 16 + l);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_is_found_in_header_or_query() {
        assert_eq!(token_from(Some("Bearer abc"), None).as_deref(), Some("abc"));
        assert_eq!(
            token_from(None, Some("x=1&token=a%2Eb")).as_deref(),
            Some("a.b")
        );
        assert_eq!(token_from(None, Some("x=1")), None);
        assert_eq!(token_from(Some("Basic x"), None), None);
    }
}

//! `ferry-fleet token`: a gateway's JWT, signed with the fleet's key the
//! way Pulsar's token authentication verifies it.
//!
//! - HS256: HMAC-SHA256 with the secret file's bytes as they are (what the
//!   broker's `tokenSecretKey=file:///...` reads; a `data:;base64,` secret
//!   must be decoded into a file first).
//! - RS256: RSA PKCS#1 v1.5 with SHA-256, with a PKCS#8 PEM private key
//!   (`-----BEGIN PRIVATE KEY-----`); the broker verifies with the public
//!   key (`tokenPublicKey`).
//!
//! Claims: `sub` = the gateway id (the role its grants name) and, unless
//! the TTL is `never`, `exp` = now + TTL in seconds since the epoch. The
//! key is read, used and dropped; it is never logged, printed or put in an
//! error message.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ring::{hmac, rand, signature};

use crate::config::{Algorithm, FleetConfig};

/// The longest TTL accepted: ten years.
pub const MAX_TTL: Duration = Duration::from_secs(3650 * 86_400);

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("gateway {0} is not in fleet.toml (add it to [[gateways]] and run provision first)")]
    UnknownGateway(String),
    #[error("fleet.toml has no [signing] section: no key to sign tokens with")]
    NoSigningKey,
    #[error("cannot read signing.key_file {}: {source}", path.display())]
    ReadKey {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("signing.key_file {}: {reason}", path.display())]
    BadKey { path: PathBuf, reason: &'static str },
    #[error("the RSA signature failed")]
    Sign,
}

/// A `--ttl` that is not one.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("--ttl {given}: must be a whole number with a unit, s, m, h or d (3600s, 90m, 12h, 30d), at most 3650d, or `never` for a token without expiry")]
pub struct TtlError {
    given: String,
}

/// Parses a TTL: `3600s`, `90m`, `12h`, `30d`; `never` is `None` (no
/// `exp` claim). Zero and more than [`MAX_TTL`] are refused.
pub fn parse_ttl(text: &str) -> Result<Option<Duration>, TtlError> {
    let err = || TtlError {
        given: text.escape_debug().to_string(),
    };
    if text == "never" {
        return Ok(None);
    }
    let split = text.find(|c: char| !c.is_ascii_digit()).ok_or_else(err)?;
    let (number, unit) = text.split_at(split);
    let n: u64 = number.parse().map_err(|_| err())?;
    let unit = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(err()),
    };
    let secs = n.checked_mul(unit).ok_or_else(err)?;
    if secs == 0 || secs > MAX_TTL.as_secs() {
        return Err(err());
    }
    Ok(Some(Duration::from_secs(secs)))
}

/// The key tokens are signed with.
pub enum SigningKey {
    Hs256(hmac::Key),
    Rs256(signature::RsaKeyPair),
}

// Nothing of the key in debug output.
impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SigningKey::Hs256(_) => "SigningKey::Hs256(<redacted>)",
            SigningKey::Rs256(_) => "SigningKey::Rs256(<redacted>)",
        })
    }
}

impl SigningKey {
    /// Reads the key file of `[signing]`.
    pub fn load(algorithm: Algorithm, path: &Path) -> Result<SigningKey, TokenError> {
        let bytes = std::fs::read(path).map_err(|source| TokenError::ReadKey {
            path: path.to_path_buf(),
            source,
        })?;
        let bad = |reason| TokenError::BadKey {
            path: path.to_path_buf(),
            reason,
        };
        match algorithm {
            Algorithm::Hs256 => {
                if bytes.is_empty() {
                    return Err(bad("is empty"));
                }
                Ok(SigningKey::Hs256(hmac::Key::new(hmac::HMAC_SHA256, &bytes)))
            }
            Algorithm::Rs256 => {
                let der = pem_private_key(&bytes).ok_or_else(|| {
                    bad("is not a PKCS#8 PEM private key (-----BEGIN PRIVATE KEY-----)")
                })?;
                signature::RsaKeyPair::from_pkcs8(&der)
                    .map(SigningKey::Rs256)
                    .map_err(|_| bad("is not an RSA private key of 2048 bits or more in PKCS#8"))
            }
        }
    }

    fn algorithm(&self) -> &'static str {
        match self {
            SigningKey::Hs256(_) => "HS256",
            SigningKey::Rs256(_) => "RS256",
        }
    }

    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, TokenError> {
        match self {
            SigningKey::Hs256(key) => Ok(hmac::sign(key, message).as_ref().to_vec()),
            SigningKey::Rs256(key) => {
                let mut sig = vec![0; key.public().modulus_len()];
                key.sign(
                    &signature::RSA_PKCS1_SHA256,
                    &rand::SystemRandom::new(),
                    message,
                    &mut sig,
                )
                .map_err(|_| TokenError::Sign)?;
                Ok(sig)
            }
        }
    }
}

/// The DER inside the first `PRIVATE KEY` PEM block of `pem`.
fn pem_private_key(pem: &[u8]) -> Option<Vec<u8>> {
    let text = std::str::from_utf8(pem).ok()?;
    let begin = "-----BEGIN PRIVATE KEY-----";
    let start = text.find(begin)? + begin.len();
    let end = start + text[start..].find("-----END PRIVATE KEY-----")?;
    let body: String = text[start..end]
        .chars()
        .filter(|c| !c.is_ascii_whitespace())
        .collect();
    base64::engine::general_purpose::STANDARD.decode(body).ok()
}

/// A JWT for `subject`: header, claims and signature, base64url without
/// padding. `expires`: seconds since the epoch, or no `exp` claim.
pub fn encode(key: &SigningKey, subject: &str, expires: Option<u64>) -> Result<String, TokenError> {
    let header = serde_json::json!({ "alg": key.algorithm(), "typ": "JWT" });
    let mut claims = serde_json::json!({ "sub": subject });
    if let Some(exp) = expires {
        claims["exp"] = exp.into();
    }
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let sig = key.sign(signing_input.as_bytes())?;
    Ok(format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(sig)))
}

/// `ferry-fleet token GATEWAY --ttl D`: the gateway's token, valid for
/// `ttl` from `now` (`None`: without expiry).
pub fn issue(
    config: &FleetConfig,
    gateway: &str,
    ttl: Option<Duration>,
    now: SystemTime,
) -> Result<String, TokenError> {
    if !config.gateways.iter().any(|g| g == gateway) {
        return Err(TokenError::UnknownGateway(
            gateway.escape_debug().to_string(),
        ));
    }
    let signing = config.signing.as_ref().ok_or(TokenError::NoSigningKey)?;
    let key = SigningKey::load(signing.algorithm, &signing.key_file)?;
    let now = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    encode(&key, gateway, ttl.map(|t| (now + t).as_secs()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(part: &str) -> serde_json::Value {
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).unwrap()).unwrap()
    }

    #[test]
    fn ttls_have_a_unit_and_never_means_no_expiry() {
        assert_eq!(parse_ttl("3600s"), Ok(Some(Duration::from_secs(3600))));
        assert_eq!(parse_ttl("90m"), Ok(Some(Duration::from_secs(5400))));
        assert_eq!(parse_ttl("12h"), Ok(Some(Duration::from_secs(43_200))));
        assert_eq!(parse_ttl("30d"), Ok(Some(Duration::from_secs(2_592_000))));
        assert_eq!(parse_ttl("3650d"), Ok(Some(MAX_TTL)));
        assert_eq!(parse_ttl("never"), Ok(None));
        for bad in [
            "",
            "3600",
            "0s",
            "-5m",
            "1.5h",
            "h",
            "12 h",
            "3651d",
            "1w",
            "99999999999999999999s",
            "12H",
        ] {
            assert!(parse_ttl(bad).is_err(), "{bad}");
        }
        assert!(parse_ttl("1w")
            .unwrap_err()
            .to_string()
            .starts_with("--ttl 1w: must be"));
    }

    #[test]
    fn an_hs256_token_carries_sub_and_exp_and_verifies_with_the_secret() {
        let secret = b"0123456789abcdef0123456789abcdef";
        let key = SigningKey::Hs256(hmac::Key::new(hmac::HMAC_SHA256, secret));
        let token = encode(&key, "gw-a", Some(1_700_000_000)).unwrap();
        let parts: Vec<&str> = token.split('.').collect();
        assert_eq!(parts.len(), 3);
        assert_eq!(
            decode(parts[0]),
            serde_json::json!({"alg": "HS256", "typ": "JWT"})
        );
        assert_eq!(
            decode(parts[1]),
            serde_json::json!({"sub": "gw-a", "exp": 1_700_000_000u64})
        );
        let verify = hmac::Key::new(hmac::HMAC_SHA256, secret);
        let sig = URL_SAFE_NO_PAD.decode(parts[2]).unwrap();
        hmac::verify(
            &verify,
            format!("{}.{}", parts[0], parts[1]).as_bytes(),
            &sig,
        )
        .unwrap();
        // No padding, URL-safe alphabet.
        assert!(!token.contains(['=', '+', '/']));
        let forever = encode(&key, "gw-a", None).unwrap();
        assert_eq!(
            decode(forever.split('.').nth(1).unwrap()),
            serde_json::json!({"sub": "gw-a"})
        );
    }

    /// A fresh RSA key made by openssl (which the test stack needs too).
    fn rsa_key_file(dir: &Path) -> PathBuf {
        let path = dir.join("rsa.key");
        let status = std::process::Command::new("openssl")
            .args([
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
                "-out",
            ])
            .arg(&path)
            .stderr(std::process::Stdio::null())
            .status()
            .expect("openssl");
        assert!(status.success());
        path
    }

    #[test]
    fn an_rs256_token_verifies_with_the_public_key() {
        let dir = std::env::temp_dir().join(format!("fleet-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = rsa_key_file(&dir);
        let key = SigningKey::load(Algorithm::Rs256, &path).unwrap();
        let SigningKey::Rs256(pair) = &key else {
            unreachable!()
        };
        let public = pair.public().as_ref().to_vec();
        let token = encode(&key, "gw-b", Some(42)).unwrap();
        let parts: Vec<&str> = token.split('.').collect();
        assert_eq!(decode(parts[0])["alg"], "RS256");
        let sig = URL_SAFE_NO_PAD.decode(parts[2]).unwrap();
        signature::UnparsedPublicKey::new(&signature::RSA_PKCS1_2048_8192_SHA256, &public)
            .verify(format!("{}.{}", parts[0], parts[1]).as_bytes(), &sig)
            .unwrap();
        // Not PEM, or PEM of something else: refused, without the content.
        std::fs::write(dir.join("hs.key"), b"raw secret bytes").unwrap();
        let err = SigningKey::load(Algorithm::Rs256, &dir.join("hs.key")).unwrap_err();
        assert!(
            err.to_string().contains("is not a PKCS#8 PEM private key"),
            "{err}"
        );
        assert!(!err.to_string().contains("raw secret"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn only_gateways_of_the_fleet_get_a_token() {
        let dir = std::env::temp_dir().join(format!("fleet-issue-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let secret = dir.join("secret.key");
        std::fs::write(&secret, [7u8; 32]).unwrap();
        let config = crate::config::parse(&format!(
            "[pulsar]\nservice_url = \"pulsar://h:6650\"\nadmin_url = \"http://h:8080\"\n\
             [namespace]\ntenant = \"iot\"\nname = \"fleet\"\n\
             [signing]\nkey_file = \"{}\"\n[[gateways]]\nid = \"gw-a\"\n",
            secret.display()
        ))
        .unwrap();
        let now = UNIX_EPOCH + Duration::from_secs(1_000);
        let token = issue(&config, "gw-a", Some(Duration::from_secs(3600)), now).unwrap();
        assert_eq!(
            decode(token.split('.').nth(1).unwrap()),
            serde_json::json!({"sub": "gw-a", "exp": 4600})
        );
        let err = issue(&config, "gw-z", None, now).unwrap_err();
        assert_eq!(
            err.to_string(),
            "gateway gw-z is not in fleet.toml (add it to [[gateways]] and run provision first)"
        );
        let mut unsigned = config.clone();
        unsigned.signing = None;
        assert!(matches!(
            issue(&unsigned, "gw-a", None, now),
            Err(TokenError::NoSigningKey)
        ));
        std::fs::write(&secret, b"").unwrap();
        assert!(issue(&config, "gw-a", None, now)
            .unwrap_err()
            .to_string()
            .ends_with("is empty"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}

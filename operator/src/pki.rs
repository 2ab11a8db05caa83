//! Key material the operator (and `presence-operator dev`) generates: nkey
//! users, route passwords, a CA and the NATS servers' certificate. Made once
//! and kept in Secrets (files for `dev`); only the certificate is renewed.

use crate::crd::PresenceClusterSpec;
use crate::render::Scope;
use time::OffsetDateTime;

/// How long an issued server certificate is valid.
pub const CERT_LIFETIME: time::Duration = time::Duration::days(365);
/// A certificate with less than this left is renewed.
pub const RENEW_BEFORE: time::Duration = time::Duration::days(30);
/// How long the generated CA is valid.
const CA_LIFETIME: time::Duration = time::Duration::days(3650);

/// Why key material could not be made or read.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("cannot make a key or certificate: {0}")]
    Generate(String),
    #[error("{0} is not a user nkey seed")]
    BadSeed(String),
}

fn generate_err(e: impl std::fmt::Display) -> PkiError {
    PkiError::Generate(e.to_string())
}

/// A NATS user: its seed (secret) and public key (for configs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub seed: String,
    pub public: String,
}

/// A fresh nkey user.
pub fn new_user() -> Result<Identity, PkiError> {
    let pair = nkeys::KeyPair::new_user();
    Ok(Identity {
        seed: pair.seed().map_err(generate_err)?,
        public: pair.public_key(),
    })
}

/// The public key of a user seed.
pub fn public_of(seed: &str, whose: &str) -> Result<String, PkiError> {
    let pair =
        nkeys::KeyPair::from_seed(seed.trim()).map_err(|_| PkiError::BadSeed(whose.to_owned()))?;
    let public = pair.public_key();
    if !public.starts_with('U') {
        return Err(PkiError::BadSeed(whose.to_owned()));
    }
    Ok(public)
}

/// A certificate and its key, PEM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertPair {
    pub cert: String,
    pub key: String,
}

fn ca_params(name: &str, now: OffsetDateTime) -> Result<rcgen::CertificateParams, PkiError> {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(generate_err)?;
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    params.distinguished_name.push(
        rcgen::DnType::CommonName,
        format!("PresenceCluster {name} NATS CA"),
    );
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    params.not_before = now;
    params.not_after = now + CA_LIFETIME;
    Ok(params)
}

/// A new CA for the PresenceCluster `name`.
pub fn new_ca(name: &str, now: OffsetDateTime) -> Result<CertPair, PkiError> {
    let key = rcgen::KeyPair::generate().map_err(generate_err)?;
    let cert = ca_params(name, now)?
        .self_signed(&key)
        .map_err(generate_err)?;
    Ok(CertPair {
        cert: cert.pem(),
        key: key.serialize_pem(),
    })
}

/// A server (and route client) certificate for `sans`, signed by the CA
/// of `name` whose key is `ca_key`.
pub fn issue(
    name: &str,
    ca_key: &str,
    sans: &[String],
    now: OffsetDateTime,
) -> Result<CertPair, PkiError> {
    let ca_key = rcgen::KeyPair::from_pem(ca_key).map_err(generate_err)?;
    // The issuer is named as the CA was (same name, same key), so the new
    // certificate chains to the CA certificate already in the Secret.
    let issuer = rcgen::Issuer::new(ca_params(name, now)?, ca_key);
    let key = rcgen::KeyPair::generate().map_err(generate_err)?;
    let mut params = rcgen::CertificateParams::new(sans.to_vec()).map_err(generate_err)?;
    params.distinguished_name.push(
        rcgen::DnType::CommonName,
        format!("PresenceCluster {name} NATS"),
    );
    params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.not_before = now;
    params.not_after = now + CERT_LIFETIME;
    let cert = params.signed_by(&key, &issuer).map_err(generate_err)?;
    Ok(CertPair {
        cert: cert.pem(),
        key: key.serialize_pem(),
    })
}

/// Every name the NATS servers of `spec` are reached by in the cluster:
/// each region's client Service (short and qualified) and its pods through
/// the headless Service.
pub fn nats_sans(scope: &Scope, spec: &PresenceClusterSpec) -> Vec<String> {
    let ns = &scope.namespace;
    let mut sans = Vec::new();
    for region in spec.regions() {
        let service = scope.names.nats(region.name);
        let headless = scope.names.nats_headless(region.name);
        sans.push(service.clone());
        sans.push(format!("{service}.{ns}"));
        sans.push(format!("{service}.{ns}.svc"));
        sans.push(format!("{service}.{ns}.svc.cluster.local"));
        sans.push(format!("*.{headless}.{ns}.svc"));
        sans.push(format!("*.{headless}.{ns}.svc.cluster.local"));
    }
    // The address leaves in other clusters dial.
    if let Some((host, _)) = spec.leafnode_advertise().and_then(|a| a.rsplit_once(':')) {
        sans.push(host.to_owned());
    }
    sans
}

/// When the first certificate in `pem` expires.
pub fn not_after(pem: &str) -> Option<OffsetDateTime> {
    let der = pem_body(pem)?;
    der::certificate_not_after(&der)
}

/// Whether a certificate expiring at `not_after` should be renewed now.
pub fn needs_renewal(not_after: OffsetDateTime, now: OffsetDateTime) -> bool {
    not_after - now < RENEW_BEFORE
}

fn pem_body(pem: &str) -> Option<Vec<u8>> {
    let start = pem.find("-----BEGIN CERTIFICATE-----")? + "-----BEGIN CERTIFICATE-----".len();
    let end = pem[start..].find("-----END CERTIFICATE-----")? + start;
    let text: String = pem[start..end]
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    base64_decode(&text)
}

fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let value = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        })
    };
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for &c in text.trim_end_matches('=').as_bytes() {
        acc = (acc << 6) | value(c)?;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push(u8::try_from((acc >> bits) & 0xff).ok()?);
        }
    }
    Some(out)
}

/// Just enough DER to read a certificate's validity.
mod der {
    use time::OffsetDateTime;

    /// (tag, content, rest) of the element at the start of `input`.
    fn element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
        let tag = *input.first()?;
        let first = *input.get(1)?;
        let (len, header) = if first < 0x80 {
            (usize::from(first), 2)
        } else {
            let n = usize::from(first & 0x7f);
            let bytes = input.get(2..2 + n)?;
            let len = bytes.iter().try_fold(0usize, |acc, b| {
                acc.checked_mul(256)?.checked_add(usize::from(*b))
            })?;
            (len, 2 + n)
        };
        let content = input.get(header..header.checked_add(len)?)?;
        Some((tag, content, &input[header + len..]))
    }

    /// Certificate ::= SEQUENCE { tbsCertificate SEQUENCE { [0] version?,
    /// serial, signature, issuer, validity SEQUENCE { notBefore, notAfter } ... } ... }
    pub fn certificate_not_after(der: &[u8]) -> Option<OffsetDateTime> {
        let (_, certificate, _) = element(der)?;
        let (_, mut tbs, _) = element(certificate)?;
        if tbs.first() == Some(&0xa0) {
            tbs = element(tbs)?.2;
        }
        let (_, _, rest) = element(tbs)?; // serial
        let (_, _, rest) = element(rest)?; // signature algorithm
        let (_, _, rest) = element(rest)?; // issuer
        let (_, validity, _) = element(rest)?;
        let (_, _, rest) = element(validity)?; // notBefore
        let (tag, time, _) = element(rest)?;
        parse_time(tag, std::str::from_utf8(time).ok()?)
    }

    /// UTCTime (YYMMDDHHMMSSZ) or GeneralizedTime (YYYYMMDDHHMMSSZ).
    fn parse_time(tag: u8, text: &str) -> Option<OffsetDateTime> {
        let digits = text.strip_suffix('Z')?;
        let (year, rest) = match tag {
            0x17 => {
                let yy: i32 = digits.get(..2)?.parse().ok()?;
                (
                    if yy < 50 { 2000 + yy } else { 1900 + yy },
                    digits.get(2..)?,
                )
            }
            0x18 => (digits.get(..4)?.parse().ok()?, digits.get(4..)?),
            _ => return None,
        };
        let field = |i: usize| -> Option<u8> { rest.get(i..i + 2)?.parse().ok() };
        let month = time::Month::try_from(field(0)?).ok()?;
        let date = time::Date::from_calendar_date(year, month, field(2)?).ok()?;
        let clock = time::Time::from_hms(field(4)?, field(6)?, field(8)?).ok()?;
        Some(date.with_time(clock).assume_utc())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_give_their_public_keys() {
        let user = new_user().unwrap();
        assert!(user.seed.starts_with("SU") && user.public.starts_with('U'));
        assert_eq!(public_of(&user.seed, "x").unwrap(), user.public);
        assert!(public_of("not a seed", "x").is_err());
    }

    #[test]
    fn issued_certificates_expire_when_asked_and_renew_in_time() {
        let now = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
        let ca = new_ca("p", now).unwrap();
        let issued = issue(
            "p",
            &ca.key,
            &["p-center-nats.ns.svc".into(), "127.0.0.1".into()],
            now,
        )
        .unwrap();
        assert_eq!(not_after(&issued.cert), Some(now + CERT_LIFETIME));
        assert_eq!(not_after(&ca.cert), Some(now + time::Duration::days(3650)));
        assert!(!needs_renewal(now + CERT_LIFETIME, now));
        assert!(needs_renewal(
            now + CERT_LIFETIME,
            now + CERT_LIFETIME - time::Duration::days(29)
        ));
        assert_eq!(not_after("garbage"), None);
    }
}

//! Value rules that `presence-service` enforces at start and that the
//! operator must check before it renders them, so that a value the service
//! would refuse is reported on the `PresenceCluster` (`InvalidSpec`,
//! `InvalidSecret`) instead of showing up as pods that crash at start.

/// The shortest `JWT_SECRET` the service accepts, in bytes: HS256 with a
/// shorter secret is guessable offline from one token.
pub const MIN_JWT_SECRET_BYTES: usize = 16;

/// The `JWT_SECRET` length RFC 7518 §3.2 asks of an HS256 key (the hash's
/// 256 bits). Shorter ones down to [`MIN_JWT_SECRET_BYTES`] still start,
/// as the Go service took them, with a warning.
pub const RECOMMENDED_JWT_SECRET_BYTES: usize = 32;

/// Why a JWT secret is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JwtSecretProblem {
    /// Not UTF-8: an environment variable the service reads as text.
    NotText,
    /// Empty or only whitespace.
    Blank,
    /// Shorter than [`MIN_JWT_SECRET_BYTES`]; carries the length.
    Short(usize),
}

impl std::fmt::Display for JwtSecretProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JwtSecretProblem::NotText => write!(f, "is not UTF-8 text"),
            JwtSecretProblem::Blank => write!(f, "is empty"),
            JwtSecretProblem::Short(len) => write!(
                f,
                "is {len} bytes; at least {MIN_JWT_SECRET_BYTES} are needed"
            ),
        }
    }
}

/// Why a JWT secret is refused, if it is.
pub fn jwt_secret_problem(secret: &[u8]) -> Option<JwtSecretProblem> {
    let Ok(text) = std::str::from_utf8(secret) else {
        return Some(JwtSecretProblem::NotText);
    };
    if text.trim().is_empty() {
        return Some(JwtSecretProblem::Blank);
    }
    (secret.len() < MIN_JWT_SECRET_BYTES).then_some(JwtSecretProblem::Short(secret.len()))
}

/// `HTTP_MAX_CONNECTIONS` when unset.
pub const DEFAULT_HTTP_MAX_CONNECTIONS: usize = 20_000;
/// The largest `HTTP_MAX_CONNECTIONS` (and `STREAM_MAX_CONNECTIONS`).
pub const MAX_HTTP_CONNECTIONS: usize = 1_000_000;
/// Connections a node keeps for requests other than change streams when
/// its stream cap is raised: the HTTP cap is at least the stream cap plus
/// this, so streams at their cap leave room for reads and writes.
pub const HTTP_CONNECTIONS_BESIDE_STREAMS: usize = 1_000;

/// `HTTP_MAX_CONNECTIONS` for a node whose `STREAM_MAX_CONNECTIONS` is
/// `streams`: the default, or more when the streams alone would fill it.
pub fn http_connections_for_streams(streams: usize) -> usize {
    streams
        .saturating_add(HTTP_CONNECTIONS_BESIDE_STREAMS)
        .clamp(DEFAULT_HTTP_MAX_CONNECTIONS, MAX_HTTP_CONNECTIONS)
}

/// `CORS_ALLOWED_ORIGINS` when unset.
pub const DEFAULT_CORS_ORIGINS: &str = "*";
/// `CORS_ALLOWED_METHODS` when unset.
pub const DEFAULT_CORS_METHODS: &str = "GET,POST,PUT,DELETE,OPTIONS";
/// `CORS_ALLOWED_HEADERS` when unset.
pub const DEFAULT_CORS_HEADERS: &str = "Authorization,Content-Type";

/// The items of a comma-separated variable, trimmed, empty ones dropped:
/// what the service reads from the operator's list joined with commas.
pub fn split_list(raw: &str) -> Vec<&str> {
    raw.split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .collect()
}

/// Why a CORS origin is refused, if it is: `*`, or an origin as a browser
/// sends it in its `Origin` header (`https://app.example.com`, with a
/// port if any): a scheme and a host in lowercase visible ASCII
/// (international names in punycode), no path, no trailing `/`, and no
/// comma (the variable is a comma-separated list). The CORS layer compares
/// origins byte for byte, so anything else could never match and would be
/// dropped without a word.
pub fn cors_origin_problem(origin: &str) -> Option<String> {
    if origin == "*" {
        return None;
    }
    let host = origin
        .strip_prefix("https://")
        .or_else(|| origin.strip_prefix("http://"));
    let as_sent = |b: u8| b.is_ascii_graphic() && !b.is_ascii_uppercase() && !b",/?#".contains(&b);
    match host {
        Some(host) if !host.is_empty() && host.bytes().all(as_sent) => None,
        _ => Some(format!(
            "{origin:?} is not an origin as browsers send it, like https://app.example.com \
             (lowercase, no path or trailing '/', international names in punycode)"
        )),
    }
}

/// Why a CORS method is refused, if it is: methods are letters only.
pub fn cors_method_problem(method: &str) -> Option<String> {
    let valid = !method.is_empty() && method.bytes().all(|b| b.is_ascii_alphabetic());
    (!valid).then(|| format!("{method:?} is not an HTTP method"))
}

/// Why a CORS header name is refused, if it is: an HTTP token (RFC 9110
/// §5.6.2), as the `http` crate parses header names.
pub fn cors_header_problem(header: &str) -> Option<String> {
    let is_token_char = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    let valid = !header.is_empty() && header.bytes().all(is_token_char);
    (!valid).then(|| format!("{header:?} is not a header name"))
}

/// The first problem of a CORS policy, with the variable it is in: an
/// origin list that is empty, or `*` with credentials, or any value that
/// the three checks above refuse.
pub fn cors_problem<S: AsRef<str>>(
    origins: &[S],
    methods: &[S],
    headers: &[S],
    allow_credentials: bool,
) -> Option<(&'static str, String)> {
    use crate::env;
    if origins.is_empty() {
        return Some((
            env::CORS_ALLOWED_ORIGINS,
            "must list origins or be '*' (or set CORS_ENABLED=false)".into(),
        ));
    }
    if allow_credentials && origins.iter().any(|o| o.as_ref() == "*") {
        return Some((
            env::CORS_ALLOWED_ORIGINS,
            "'*' cannot be combined with CORS_ALLOW_CREDENTIALS=true; list explicit origins".into(),
        ));
    }
    let first = |values: &[S], problem: fn(&str) -> Option<String>| {
        values.iter().find_map(|value| problem(value.as_ref()))
    };
    first(origins, cors_origin_problem)
        .map(|p| (env::CORS_ALLOWED_ORIGINS, p))
        .or_else(|| first(methods, cors_method_problem).map(|p| (env::CORS_ALLOWED_METHODS, p)))
        .or_else(|| first(headers, cors_header_problem).map(|p| (env::CORS_ALLOWED_HEADERS, p)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_http_cap_leaves_room_beside_the_streams() {
        assert_eq!(
            http_connections_for_streams(10_000),
            DEFAULT_HTTP_MAX_CONNECTIONS
        );
        assert_eq!(http_connections_for_streams(20_000), 21_000);
        assert_eq!(
            http_connections_for_streams(MAX_HTTP_CONNECTIONS),
            MAX_HTTP_CONNECTIONS
        );
        assert_eq!(
            http_connections_for_streams(usize::MAX),
            MAX_HTTP_CONNECTIONS
        );
    }

    #[test]
    fn jwt_secrets_need_sixteen_bytes_of_text_that_are_not_all_blank() {
        assert_eq!(jwt_secret_problem(b"0123456789abcdef"), None);
        assert_eq!(
            jwt_secret_problem(b"your-secret-key"),
            Some(JwtSecretProblem::Short(15))
        );
        assert_eq!(jwt_secret_problem(b""), Some(JwtSecretProblem::Blank));
        let blank = "\u{a0}\u{b}                ".as_bytes();
        assert_eq!(jwt_secret_problem(blank), Some(JwtSecretProblem::Blank));
        let random = [0xffu8; 32];
        assert_eq!(jwt_secret_problem(&random), Some(JwtSecretProblem::NotText));
    }

    #[test]
    fn lists_are_split_trimmed_and_emptied_of_blanks() {
        assert_eq!(split_list(" a , ,b,"), ["a", "b"]);
        assert!(split_list(" ").is_empty());
    }

    #[test]
    fn origins_are_a_star_or_a_scheme_and_a_host() {
        for good in ["*", "https://app.example.com", "http://127.0.0.1:8078"] {
            assert_eq!(cors_origin_problem(good), None, "{good}");
        }
        for bad in [
            "app.example.com",
            "https://",
            "ftp://x",
            "https://a.com,https://b.com",
            "https://a b",
            "https://a\u{1}b",
            "https://bücher.example",
            "https://a.example/",
            "https://a.example/app",
            "https://App.example",
            "",
        ] {
            assert!(cors_origin_problem(bad).is_some(), "{bad:?}");
        }
    }

    #[test]
    fn methods_and_headers_are_tokens() {
        assert_eq!(cors_method_problem("PATCH"), None);
        assert!(cors_method_problem("GE T").is_some());
        assert!(cors_method_problem("").is_some());
        assert_eq!(cors_header_problem("X-Request-ID"), None);
        assert!(cors_header_problem("X Request").is_some());
        assert!(cors_header_problem("X:Y").is_some());
    }

    #[test]
    fn a_policy_names_the_variable_of_its_first_problem() {
        let variable =
            |o: &[&str], m: &[&str], h: &[&str], c| cors_problem(o, m, h, c).map(|p| p.0);
        assert_eq!(variable(&["*"], &["GET"], &["Authorization"], false), None);
        assert_eq!(variable(&[], &[], &[], false), Some("CORS_ALLOWED_ORIGINS"));
        assert_eq!(
            variable(&["*"], &[], &[], true),
            Some("CORS_ALLOWED_ORIGINS")
        );
        assert_eq!(
            variable(&["https://a.io"], &["G T"], &[], true),
            Some("CORS_ALLOWED_METHODS")
        );
        assert_eq!(
            variable(&["*"], &["GET"], &["a b"], false),
            Some("CORS_ALLOWED_HEADERS")
        );
    }
}

//! Who may do what on the NATS servers the operator renders, as `nats.conf`
//! text: one account holding the presence data, nkey users with the least
//! permissions each needs (presence-service, the operator, one per leaf
//! region), authenticated routes, and TLS on the leafnode link (and, when
//! asked, on client and route ports).
//!
//! The config only ever names public keys and environment variables
//! (`$LEAF_NKEY_SEED`, `$ROUTE_PASSWORD`, `$ROUTE_<i>`): secrets stay in
//! Secrets, and the rendered ConfigMap can be read by anyone.

use std::fmt::Write;

/// The account that holds the bucket and every user of it.
pub const ACCOUNT: &str = "PRESENCE";
/// Environment variable carrying a leaf server's nkey seed.
pub const LEAF_SEED_ENV: &str = "LEAF_NKEY_SEED";
/// Environment variable carrying the route password.
pub const ROUTE_PASSWORD_ENV: &str = "ROUTE_PASSWORD";
/// User name of every route.
pub const ROUTE_USER: &str = "route";

/// Environment variable carrying route `i`'s URL (with its credentials).
pub fn route_env(i: usize) -> String {
    format!("ROUTE_{i}")
}

/// Paths of the TLS files inside a NATS server's filesystem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: String,
    pub key: String,
    pub ca: String,
}

/// Everything a server's config needs to authenticate and encrypt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecurityParams {
    pub bucket: String,
    /// The hub's JetStream domain.
    pub domain: String,
    /// presence-service's public nkey.
    pub presence_user: String,
    /// The operator's public nkey (hub servers only).
    pub operator_user: Option<String>,
    /// Each leaf region's public nkey (hub servers only).
    pub leaf_users: Vec<String>,
    pub tls: TlsFiles,
    /// TLS on the client port too.
    pub client_tls: bool,
    /// Mutual TLS on routes too.
    pub route_tls: bool,
}

fn quoted(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// The JetStream API subjects for `ops` on the bucket's stream, with and
/// without the hub's domain prefix (a leaf server forwards the prefixed
/// form; the hub maps it before checking).
fn js_api(domain: &str, bucket: &str, ops: &[&str]) -> Vec<String> {
    let stream = presence_contract::bucket::stream_name(bucket);
    let mut out = Vec::new();
    for prefix in ["$JS.API".to_owned(), format!("$JS.{domain}.API")] {
        for op in ops {
            out.push(match *op {
                "INFO" => format!("{prefix}.INFO"),
                op if op.ends_with(".>") => {
                    format!("{prefix}.{}.{stream}.>", op.trim_end_matches(".>"))
                }
                op => format!("{prefix}.{op}.{stream}"),
            });
        }
    }
    out
}

/// What async-nats' KV client of presence-service sends: puts, reads
/// (direct get and message get), the watch's ordered consumer and its flow
/// control; `create` also lets it create a missing bucket (the center).
pub fn presence_publish(bucket: &str, domain: &str, create: bool) -> Vec<String> {
    let mut ops = vec![
        "INFO",
        "STREAM.INFO",
        "DIRECT.GET",
        "DIRECT.GET.>",
        "STREAM.MSG.GET",
        "CONSUMER.CREATE",
        "CONSUMER.CREATE.>",
        "CONSUMER.DELETE.>",
    ];
    if create {
        ops.push("STREAM.CREATE");
    }
    let mut subjects = vec![
        format!("$KV.{bucket}.>"),
        format!("$JS.{domain}.API.$KV.{bucket}.>"),
    ];
    subjects.extend(js_api(domain, bucket, &ops));
    subjects.push(format!(
        "$JS.FC.{}.>",
        presence_contract::bucket::stream_name(bucket)
    ));
    subjects
}

/// What the operator sends: the bucket's stream info, create, update and
/// delete (for `deletionPolicy: Delete`); it never reads or writes keys.
pub fn operator_publish(bucket: &str, domain: &str) -> Vec<String> {
    js_api(
        domain,
        bucket,
        &[
            "INFO",
            "STREAM.INFO",
            "STREAM.CREATE",
            "STREAM.UPDATE",
            "STREAM.DELETE",
        ],
    )
}

/// What a leaf server may send into the hub: presence-service's traffic,
/// through the hub's domain, without creating anything.
pub fn leaf_publish(bucket: &str, domain: &str) -> Vec<String> {
    presence_publish(bucket, domain, false)
        .into_iter()
        .filter(|s| !s.starts_with("$JS.API.") && !s.starts_with("$KV."))
        .collect()
}

fn user(out: &mut String, nkey: &str, publish: &[String], connection_type: &str) {
    let allow: Vec<String> = publish.iter().map(|s| quoted(s)).collect();
    let _ = writeln!(out, "      {{");
    let _ = writeln!(out, "        nkey: {nkey}");
    let _ = writeln!(out, "        permissions: {{");
    let _ = writeln!(
        out,
        "          publish: {{ allow: [{}] }}",
        allow.join(", ")
    );
    let _ = writeln!(out, "          subscribe: {{ allow: [\"_INBOX.>\"] }}");
    let _ = writeln!(out, "        }}");
    let _ = writeln!(
        out,
        "        allowed_connection_types: [{}]",
        quoted(connection_type)
    );
    let _ = writeln!(out, "      }}");
}

/// The `accounts {}` block: the presence account and its users. The hub
/// holds JetStream for it and knows the operator and every leaf region.
pub fn accounts_block(out: &mut String, s: &SecurityParams, hub: bool) {
    let _ = writeln!(out, "\naccounts {{\n  {ACCOUNT} {{");
    if hub {
        out.push_str("    jetstream: enabled\n");
    }
    out.push_str("    users: [\n");
    user(
        out,
        &s.presence_user,
        &presence_publish(&s.bucket, &s.domain, hub),
        "STANDARD",
    );
    if let Some(operator) = &s.operator_user {
        user(
            out,
            operator,
            &operator_publish(&s.bucket, &s.domain),
            "STANDARD",
        );
    }
    for leaf in &s.leaf_users {
        user(out, leaf, &leaf_publish(&s.bucket, &s.domain), "LEAFNODE");
    }
    out.push_str("    ]\n  }\n}\n");
}

/// A `tls {}` block; `ca` also makes the server verify its peers.
pub fn tls_block(out: &mut String, indent: &str, files: &TlsFiles, verify_peers: bool) {
    let _ = writeln!(out, "{indent}tls {{");
    let _ = writeln!(out, "{indent}  cert_file: {}", quoted(&files.cert));
    let _ = writeln!(out, "{indent}  key_file: {}", quoted(&files.key));
    if verify_peers {
        let _ = writeln!(out, "{indent}  ca_file: {}", quoted(&files.ca));
        let _ = writeln!(out, "{indent}  verify: true");
    }
    let _ = writeln!(out, "{indent}  timeout: 3");
    let _ = writeln!(out, "{indent}}}");
}

/// A route URL with the route credentials in it, for `$ROUTE_<i>`; the
/// password is a literal (local processes) or `$(ROUTE_PASSWORD)`, which
/// Kubernetes expands from the container's own environment.
pub fn route_url_with_credentials(url: &str, password: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => format!("{scheme}://{ROUTE_USER}:{password}@{rest}"),
        None => format!("{ROUTE_USER}:{password}@{url}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_identity_gets_only_its_subjects() {
        let presence = presence_publish("PRESENCE", "hub", false);
        assert!(presence.contains(&"$KV.PRESENCE.>".to_owned()));
        assert!(presence.contains(&"$JS.hub.API.CONSUMER.CREATE.KV_PRESENCE.>".to_owned()));
        assert!(presence.contains(&"$JS.FC.KV_PRESENCE.>".to_owned()));
        assert!(
            !presence
                .iter()
                .any(|s| s.contains("DELETE.KV_PRESENCE") && s.contains("STREAM"))
        );
        assert!(!presence.iter().any(|s| s.contains("STREAM.CREATE")));
        assert!(
            presence_publish("PRESENCE", "hub", true)
                .contains(&"$JS.API.STREAM.CREATE.KV_PRESENCE".to_owned())
        );
        let operator = operator_publish("PRESENCE", "hub");
        assert!(operator.contains(&"$JS.API.STREAM.DELETE.KV_PRESENCE".to_owned()));
        assert!(
            !operator.iter().any(|s| s.contains("$KV.")),
            "the operator never touches keys"
        );
        let leaf = leaf_publish("PRESENCE", "hub");
        assert!(
            leaf.iter()
                .all(|s| s.starts_with("$JS.hub.API.") || s.starts_with("$JS.FC.")),
            "{leaf:?}"
        );
        assert!(leaf.iter().any(|s| s == "$JS.hub.API.$KV.PRESENCE.>"));
    }

    #[test]
    fn route_urls_carry_credentials() {
        assert_eq!(
            route_url_with_credentials("nats://h-0.svc:6222", "$(ROUTE_PASSWORD)"),
            "nats://route:$(ROUTE_PASSWORD)@h-0.svc:6222"
        );
    }
}

//! presence-service against a NATS server that requires an nkey and TLS,
//! as the operator configures it: it connects with its seed and checks the
//! server's certificate; a wrong seed or no CA gets it nowhere.

mod common;

use common::*;
use serde_json::{Value, json};
use std::path::Path;

/// A hub whose client port takes TLS only and knows one nkey user.
async fn secured_hub(root: &Path, user_public: &str) -> (Nats, testkit::pki::TestPki) {
    let pki = testkit::pki::generate(root);
    let conf = format!(
        "server_name: secured\nlisten: 127.0.0.1:{{client}}\nhttp: 127.0.0.1:{{monitor}}\n\
         jetstream {{ domain: hub, store_dir: \"{{dir}}/js\" }}\n\
         tls {{ cert_file: \"{}\", key_file: \"{}\" }}\n\
         accounts {{ PRESENCE {{ jetstream: enabled, users: [ {{ nkey: {user_public} }} ] }} }}\n",
        pki.cert.display(),
        pki.key.display(),
    );
    (Nats::custom(root, "secured", &conf).await, pki)
}

fn seed_file(root: &Path, name: &str, seed: &str) -> String {
    let path = root.join(name);
    std::fs::write(&path, seed).unwrap();
    path.display().to_string()
}

#[tokio::test]
async fn an_nkey_and_the_servers_ca_get_it_in_and_nothing_else_does() {
    let dir = tempfile::tempdir().unwrap();
    let (seed, public) = testkit::pki::nkey_user();
    let (hub, pki) = secured_hub(dir.path(), &public).await;
    let spec = |node: &'static str, extra: Vec<(&'static str, String)>| {
        let mut s = ServiceSpec::new(node, "center", hub.url());
        s.extra_env = extra;
        s
    };
    let ca = pki.ca.display().to_string();
    let node = Service::start(
        dir.path(),
        spec(
            "secure",
            vec![
                ("NATS_NKEY_SEED_FILE", seed_file(dir.path(), "seed", &seed)),
                ("NATS_TLS_CA", ca.clone()),
            ],
        ),
    )
    .await;
    let c = http();
    let auth = bearer("ann", "");
    let set = c
        .post(node.presence_url("ann"))
        .header("authorization", &auth)
        .json(&json!({"status": "busy"}))
        .send()
        .await
        .unwrap();
    assert_eq!(set.status(), 200);
    let got: Value = c
        .get(node.presence_url("ann"))
        .header("authorization", &auth)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(got["status"], "busy");
    assert!(
        !node.log().contains(&seed),
        "the seed never reaches the log"
    );

    // Another user's seed, or no CA (so no TLS), never becomes ready.
    let (stranger, _) = testkit::pki::nkey_user();
    let wrong_seed = Service::spawn(
        dir.path(),
        spec(
            "wrong-seed",
            vec![
                (
                    "NATS_NKEY_SEED_FILE",
                    seed_file(dir.path(), "stranger", &stranger),
                ),
                ("NATS_TLS_CA", ca),
            ],
        ),
    );
    let no_tls = Service::spawn(
        dir.path(),
        spec(
            "no-tls",
            vec![("NATS_NKEY_SEED_FILE", seed_file(dir.path(), "seed2", &seed))],
        ),
    );
    for (refused, why) in [
        (&wrong_seed, "authorization violation"),
        (&no_tls, "nats: IO error"),
    ] {
        wait_until(
            &format!("the refused node to log {why:?}"),
            READY_TIMEOUT,
            || async {
                let health: Value = match c.get(refused.url("/health")).send().await {
                    Ok(r) => r.json().await.unwrap_or_default(),
                    Err(_) => return false,
                };
                health["nats"]["connected"] == false && refused.log().contains(why)
            },
        )
        .await;
        let ready = c
            .get(refused.url("/health/readiness"))
            .send()
            .await
            .unwrap();
        assert_eq!(ready.status(), 503, "{}", refused.log());
        assert!(!refused.log().contains(&stranger) && !refused.log().contains(&seed));
    }
}

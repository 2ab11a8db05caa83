//! The operator and `presence-service` agree: every variable the renderer
//! emits (in Kubernetes and for `dev`) is one the service accepts, and every
//! variable a cluster deployment needs is emitted for every region.

use presence_contract::env;
use presence_operator::crd::PresenceCluster;
use presence_operator::local::{DevOptions, plan};
use presence_operator::render::{self, Child, Inputs, Scope};
use std::path::{Path, PathBuf};

/// A spec that sets every data-plane option the CRD has.
const EVERYTHING: &str = r#"
apiVersion: presencecluster.io/v1alpha1
kind: PresenceCluster
metadata: {name: full, namespace: ns}
spec:
  center: {replicas: 3}
  leaves: [{name: eu, dataplane: {cacheMaxCost: 4096, replicas: 1}}]
  dataplane:
    logLevel: debug
    cors: {enabled: true, allowedOrigins: ["https://a.example"], allowedMethods: [GET],
           allowedHeaders: [Authorization], allowCredentials: true, maxAgeSeconds: 60}
    rateLimit: {writesPerSecond: 3, burst: 4}
    streams: {maxConnections: 10, keepAliveSeconds: 5}
  auth: {issuer: iss, audience: aud}
  kv: {replicas: 3}
"#;

fn clusters() -> Vec<PresenceCluster> {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut out: Vec<PresenceCluster> = [
        "minimal.yaml",
        "dev.yaml",
        "dev-ha.yaml",
        "multi-region.yaml",
    ]
    .iter()
    .map(|name| {
        let text = std::fs::read_to_string(examples.join(name)).expect("example");
        serde_yaml::from_str(&text).expect("a PresenceCluster")
    })
    .collect();
    out.push(serde_yaml::from_str(EVERYTHING).expect("a PresenceCluster"));
    out
}

/// The variable names of every presence-service container, per Deployment.
fn rendered_env(cluster: &PresenceCluster) -> Vec<(String, Vec<String>)> {
    let scope = Scope::new(cluster, "default").expect("scope");
    let user = || presence_operator::pki::new_user().expect("nkey").public;
    let inputs = Inputs {
        generated_jwt_secret: Some("s".repeat(32)),
        jwt_secret_digest: Some("d".into()),
        nats: Some(presence_operator::render::NatsIdentities {
            presence: user(),
            operator: user(),
            leaves: cluster
                .spec
                .leaves
                .iter()
                .map(|l| (l.name.clone(), user()))
                .collect(),
            digests: Default::default(),
        }),
        ..Default::default()
    };
    render::render(cluster, &scope, &inputs)
        .expect("renders")
        .into_iter()
        .filter_map(|child| match child {
            Child::Deployment(d) => Some(d),
            _ => None,
        })
        .map(|d| {
            let name = d.metadata.name.clone().unwrap_or_default();
            let pod = d.spec.template.spec.expect("pod spec");
            let names = pod.containers[0]
                .env
                .iter()
                .flatten()
                .map(|e| e.name.clone())
                .collect();
            (name, names)
        })
        .collect()
}

#[test]
fn every_rendered_variable_is_accepted_and_every_required_one_is_rendered() {
    let accepted = presence_dataplane::config::accepted_variables();
    for cluster in clusters() {
        for (deployment, names) in rendered_env(&cluster) {
            for name in &names {
                assert!(
                    accepted.contains(name),
                    "{deployment} sets {name}, which presence-service doesn't read"
                );
            }
            for required in env::REQUIRED_IN_CLUSTER {
                assert!(
                    names.iter().any(|n| n == required),
                    "{deployment} lacks {required}"
                );
            }
        }
    }
}

#[test]
fn the_full_spec_reaches_every_optional_setting_it_has() {
    let cluster: PresenceCluster = serde_yaml::from_str(EVERYTHING).expect("a PresenceCluster");
    let (_, names) = rendered_env(&cluster).remove(0);
    for name in [
        env::JWT_ISSUER,
        env::JWT_AUDIENCE,
        env::KV_REPLICAS,
        env::LOG_LEVEL,
        env::CORS_ENABLED,
        env::CORS_ALLOWED_ORIGINS,
        env::CORS_ALLOWED_METHODS,
        env::CORS_ALLOWED_HEADERS,
        env::CORS_ALLOW_CREDENTIALS,
        env::CORS_MAX_AGE,
        env::RATE_LIMIT_WRITES_PER_SECOND,
        env::RATE_LIMIT_BURST,
        env::STREAM_MAX_CONNECTIONS,
        env::STREAM_KEEPALIVE_SECS,
        env::CACHE_MAX_COST,
    ] {
        assert!(names.iter().any(|n| n == name), "{name} is never rendered");
    }
}

#[test]
fn dev_processes_get_only_accepted_variables_and_a_valid_configuration() {
    let accepted = presence_dataplane::config::accepted_variables();
    for cluster in clusters() {
        let opts = DevOptions {
            metrics_port: None,
            base_port: 18080,
            nats_base_port: 24222,
            data_dir: PathBuf::from("/tmp/contract-test"),
            nats_server: PathBuf::from("nats-server"),
            presence_service: PathBuf::from("presence-service"),
            web_port: None,
            web_dir: None,
        };
        let data = tempfile::tempdir().unwrap();
        let security =
            presence_operator::local_security::load_or_create(data.path(), "c", &cluster.spec)
                .expect("local credentials");
        let plan = plan(&cluster, &opts, &"x".repeat(32), &security).expect("plan");
        for process in plan
            .processes
            .iter()
            .filter(|p| p.name.starts_with("presence-"))
        {
            let mut argv = vec!["presence-service".to_owned()];
            for (name, value) in &process.env {
                assert!(accepted.contains(name), "{}: {name}", process.name);
                // The same value as a flag: clap and validation accept it.
                let flag = format!("--{}", name.to_lowercase().replace('_', "-"));
                argv.push(format!("{flag}={value}"));
            }
            let cli = <presence_dataplane::config::Cli as clap::Parser>::try_parse_from(&argv)
                .unwrap_or_else(|e| panic!("{}: {e}", process.name));
            cli.serve
                .validate()
                .unwrap_or_else(|e| panic!("{}: {e}", process.name));
        }
    }
}

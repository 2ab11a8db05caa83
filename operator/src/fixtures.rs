//! Test fixtures: a mocked Kubernetes API server behind a real `kube::Client`.
//!
//! No API server can run on these machines, so the controller talks to this
//! in-memory one through `tower-test`. It keeps objects by path, implements
//! what the controller uses (get, list by label, create, server-side apply,
//! merge and JSON patches, replace with resourceVersion checks, delete), and
//! records every request so tests assert method, path and body exactly.
#![allow(clippy::too_many_lines)] // test scenarios and the mocked API server

use http::{Method, Request, Response, StatusCode};
use kube::Client;
use kube::client::Body;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// One request as the API server saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub query: String,
    pub content_type: String,
    pub body: Value,
}

#[derive(Default)]
struct State {
    objects: BTreeMap<String, Value>,
    status_overlay: BTreeMap<String, Value>,
    failures: BTreeMap<(String, String), u16>,
    log: Vec<Recorded>,
    version: u64,
}

/// The mocked API server.
#[derive(Clone, Default)]
pub struct FakeApi {
    state: Arc<Mutex<State>>,
}

/// Where a request path points.
struct Target {
    /// Collection path (`.../namespaces/ns/services`).
    collection: String,
    name: Option<String>,
    subresource: Option<String>,
}

fn parse(path: &str) -> Option<Target> {
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let base = match *segments.first()? {
        "api" => 2,
        "apis" => 3,
        _ => return None,
    };
    if segments.get(base) != Some(&"namespaces") {
        return None;
    }
    let collection_len = base + 3;
    Some(Target {
        collection: format!("/{}", segments.get(..collection_len)?.join("/")),
        name: segments.get(collection_len).map(|s| s.to_string()),
        subresource: segments.get(collection_len + 1).map(|s| s.to_string()),
    })
}

fn status_error(code: u16, reason: &str, message: &str) -> (StatusCode, Value) {
    (
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": message, "reason": reason, "code": code}),
    )
}

/// RFC 7386 JSON merge patch.
fn merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

/// The subset of RFC 6902 the finalizer helper sends: test, add, remove.
fn json_patch(target: &mut Value, ops: &Value) -> Result<(), String> {
    for op in ops.as_array().ok_or("not a JSON patch")? {
        let path = op["path"].as_str().ok_or("no path")?;
        let (parent_path, last) = path.rsplit_once('/').ok_or("bad path")?;
        match op["op"].as_str() {
            Some("test") => {
                let current = target.pointer(path).cloned().unwrap_or(Value::Null);
                if current != op["value"] {
                    return Err(format!(
                        "test failed at {path}: {current} != {}",
                        op["value"]
                    ));
                }
            }
            Some("add") => {
                let parent = ensure_parent(target, parent_path)?;
                match parent {
                    Value::Array(items) if last == "-" => items.push(op["value"].clone()),
                    Value::Object(map) => {
                        map.insert(last.to_owned(), op["value"].clone());
                    }
                    _ => return Err(format!("cannot add at {path}")),
                }
            }
            Some("remove") => {
                let parent = target.pointer_mut(parent_path).ok_or("no parent")?;
                match parent {
                    Value::Array(items) => {
                        let index: usize = last.parse().map_err(|_| "bad index")?;
                        if index >= items.len() {
                            return Err("index out of range".into());
                        }
                        items.remove(index);
                    }
                    Value::Object(map) => {
                        map.remove(last);
                    }
                    _ => return Err(format!("cannot remove at {path}")),
                }
            }
            other => return Err(format!("unsupported op {other:?}")),
        }
    }
    Ok(())
}

fn ensure_parent<'a>(target: &'a mut Value, pointer: &str) -> Result<&'a mut Value, String> {
    let mut current = target;
    for token in pointer.split('/').skip(1) {
        current = current
            .as_object_mut()
            .ok_or("parent is not an object")?
            .entry(token.to_owned())
            .or_insert_with(|| json!({}));
    }
    Ok(current)
}

fn matches_selector(object: &Value, selector: &str) -> bool {
    selector.split(',').filter(|s| !s.is_empty()).all(|term| {
        let (key, value) = term.split_once('=').unwrap_or((term, ""));
        object["metadata"]["labels"][key].as_str() == Some(value)
    })
}

fn query_param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == name).then(|| {
            v.replace("%2C", ",")
                .replace("%3D", "=")
                .replace("%2F", "/")
        })
    })
}

impl FakeApi {
    /// A client whose every request this fake answers.
    pub fn client(&self) -> Client {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let this = self.clone();
        tokio::spawn(async move {
            while let Some((request, send)) = handle.next_request().await {
                let response = this.answer(request).await;
                send.send_response(response);
            }
        });
        Client::new(service, "default")
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stores an object at `path` (e.g. a PresenceCluster before reconciling).
    pub fn insert(&self, path: &str, object: Value) {
        let mut state = self.state();
        state.version += 1;
        let mut object = object;
        object["metadata"]["resourceVersion"] = json!(state.version.to_string());
        state.objects.insert(path.to_owned(), object);
    }

    /// Removes the object at `path`, as if it was deleted and its
    /// finalizers had run.
    pub fn delete(&self, path: &str) {
        let mut state = self.state();
        state.objects.remove(path);
        state.status_overlay.remove(path);
    }

    /// The object at `path`, with its reported status.
    pub fn get(&self, path: &str) -> Option<Value> {
        let state = self.state();
        state
            .objects
            .get(path)
            .map(|o| with_overlay(o, state.status_overlay.get(path)))
    }

    /// Makes `path` report `status` (e.g. ready replicas) from now on.
    pub fn set_status(&self, path: &str, status: Value) {
        self.state().status_overlay.insert(path.to_owned(), status);
    }

    /// Makes the workload at `path` report `ready` of `pods` ready, every
    /// pod running its current spec (a rollout that has finished).
    pub fn set_pods(&self, path: &str, ready: i32, pods: i32) {
        self.set_status(
            path,
            json!({"replicas": pods, "updatedReplicas": pods, "readyReplicas": ready,
                   "availableReplicas": ready}),
        );
    }

    /// Makes every `method` request to `path` fail with `code`.
    pub fn fail(&self, method: &str, path: &str, code: u16) {
        self.state()
            .failures
            .insert((method.to_owned(), path.to_owned()), code);
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.state().log.clone()
    }

    /// Forgets the recorded requests (objects stay).
    pub fn clear_requests(&self) {
        self.state().log.clear();
    }

    /// Requests other than Events (which the recorder sends as it likes).
    pub fn requests_without_events(&self) -> Vec<Recorded> {
        self.requests()
            .into_iter()
            .filter(|r| !r.path.contains("/events"))
            .collect()
    }

    async fn answer(&self, request: Request<Body>) -> Response<Body> {
        let (parts, body) = request.into_parts();
        let bytes = body.collect_bytes().await.unwrap_or_default();
        let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        let path = parts.uri.path().to_owned();
        let query = parts.uri.query().unwrap_or_default().to_owned();
        let content_type = parts
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let (status, value) = self.handle(&parts.method, &path, &query, &content_type, &body);
        self.state().log.push(Recorded {
            method: parts.method.to_string(),
            path,
            query,
            content_type,
            body,
        });
        let bytes = serde_json::to_vec(&value).unwrap_or_default();
        Response::builder()
            .status(status)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Body::from(bytes))
            .unwrap_or_else(|_| Response::new(Body::empty()))
    }

    fn handle(
        &self,
        method: &Method,
        path: &str,
        query: &str,
        content_type: &str,
        body: &Value,
    ) -> (StatusCode, Value) {
        let Some(target) = parse(path) else {
            return status_error(404, "NotFound", &format!("unknown path {path}"));
        };
        let mut state = self.state();
        if let Some(code) = state.failures.get(&(method.to_string(), path.to_owned())) {
            return status_error(*code, "InternalError", "injected failure");
        }
        state.version += 1;
        let version = state.version.to_string();
        match (method.clone(), &target.name, &target.subresource) {
            (Method::GET, None, None) => {
                let selector = query_param(query, "labelSelector").unwrap_or_default();
                let prefix = format!("{}/", target.collection);
                let items: Vec<Value> = state
                    .objects
                    .iter()
                    .filter(|(p, o)| {
                        p.starts_with(&prefix)
                            && !p[prefix.len()..].contains('/')
                            && matches_selector(o, &selector)
                    })
                    .map(|(p, o)| with_overlay(o, state.status_overlay.get(p)))
                    .collect();
                (
                    StatusCode::OK,
                    json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": version}, "items": items}),
                )
            }
            (Method::POST, None, None) => {
                let name = body["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                let object_path = format!("{}/{name}", target.collection);
                if path.contains("/events") {
                    return (StatusCode::CREATED, body.clone());
                }
                if state.objects.contains_key(&object_path) {
                    return status_error(409, "AlreadyExists", &format!("{name} already exists"));
                }
                let mut object = body.clone();
                object["metadata"]["resourceVersion"] = json!(version);
                object["metadata"]["uid"] = json!(format!("uid-{version}"));
                state.objects.insert(object_path, object.clone());
                (StatusCode::CREATED, object)
            }
            (Method::GET, Some(name), None) => match state.objects.get(path) {
                Some(o) => (
                    StatusCode::OK,
                    with_overlay(o, state.status_overlay.get(path)),
                ),
                None => status_error(404, "NotFound", &format!("{name} not found")),
            },
            (Method::PATCH, Some(_), subresource) => {
                let object_path = format!(
                    "{}/{}",
                    target.collection,
                    target.name.clone().unwrap_or_default()
                );
                if path.contains("/events") {
                    return (StatusCode::OK, body.clone());
                }
                let existing = state.objects.get(&object_path).cloned();
                let updated = if content_type.starts_with("application/apply-patch") {
                    // Server-side apply: the applied intent replaces ours; status is kept.
                    let mut object = body.clone();
                    if let Some(status) = existing.as_ref().and_then(|e| e.get("status")) {
                        object["status"] = status.clone();
                    }
                    if let Some(uid) = existing.as_ref().and_then(|e| e["metadata"].get("uid")) {
                        object["metadata"]["uid"] = uid.clone();
                    }
                    object
                } else {
                    let Some(mut object) = existing else {
                        return status_error(404, "NotFound", "not found");
                    };
                    if content_type.starts_with("application/json-patch") {
                        if let Err(e) = json_patch(&mut object, body) {
                            return status_error(422, "Invalid", &e);
                        }
                    } else if subresource.as_deref() == Some("status") {
                        merge(&mut object["status"], &body["status"]);
                    } else {
                        merge(&mut object, body);
                    }
                    object
                };
                let mut updated = updated;
                updated["metadata"]["resourceVersion"] = json!(version);
                state.objects.insert(object_path.clone(), updated.clone());
                (
                    StatusCode::OK,
                    with_overlay(&updated, state.status_overlay.get(&object_path)),
                )
            }
            (Method::PUT, Some(name), None) => {
                let Some(existing) = state.objects.get(path) else {
                    return status_error(404, "NotFound", &format!("{name} not found"));
                };
                if existing["metadata"]["resourceVersion"] != body["metadata"]["resourceVersion"] {
                    return status_error(409, "Conflict", "the object has been modified");
                }
                let mut object = body.clone();
                object["metadata"]["resourceVersion"] = json!(version);
                state.objects.insert(path.to_owned(), object.clone());
                (StatusCode::OK, object)
            }
            (Method::DELETE, Some(name), None) => match state.objects.remove(path) {
                Some(_) => (
                    StatusCode::OK,
                    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 200}),
                ),
                None => status_error(404, "NotFound", &format!("{name} not found")),
            },
            _ => status_error(405, "MethodNotAllowed", &format!("{method} {path}")),
        }
    }
}

fn with_overlay(object: &Value, status: Option<&Value>) -> Value {
    let mut object = object.clone();
    if let Some(status) = status {
        merge(&mut object["status"], status);
    }
    object
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_patch_ops() {
        let mut v = json!({"metadata": {}});
        json_patch(
            &mut v,
            &json!([{"op": "test", "path": "/metadata/finalizers", "value": null},
                                   {"op": "add", "path": "/metadata/finalizers", "value": ["a"]}]),
        )
        .unwrap();
        json_patch(
            &mut v,
            &json!([{"op": "add", "path": "/metadata/finalizers/-", "value": "b"}]),
        )
        .unwrap();
        assert_eq!(v["metadata"]["finalizers"], json!(["a", "b"]));
        json_patch(
            &mut v,
            &json!([{"op": "test", "path": "/metadata/finalizers/0", "value": "a"},
                                   {"op": "remove", "path": "/metadata/finalizers/0"}]),
        )
        .unwrap();
        assert_eq!(v["metadata"]["finalizers"], json!(["b"]));
        assert!(
            json_patch(
                &mut v,
                &json!([{"op": "test", "path": "/metadata/finalizers/0", "value": "a"}])
            )
            .is_err()
        );
    }

    #[test]
    fn paths() {
        let t = parse("/apis/apps/v1/namespaces/ns/statefulsets/x").unwrap();
        assert_eq!(t.collection, "/apis/apps/v1/namespaces/ns/statefulsets");
        assert_eq!(t.name.as_deref(), Some("x"));
        let t = parse("/api/v1/namespaces/ns/services").unwrap();
        assert_eq!(t.collection, "/api/v1/namespaces/ns/services");
        assert!(t.name.is_none());
        let t = parse("/apis/presencecluster.io/v1alpha1/namespaces/ns/presenceclusters/p/status")
            .unwrap();
        assert_eq!(t.subresource.as_deref(), Some("status"));
    }
}

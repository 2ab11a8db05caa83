//! The OpenAPI 3.1 description of the HTTP API, served at
//! `/api/v2/openapi.json` and committed as `docs/openapi.json`.
//!
//! Bodies and query strings are described by the handlers' own types (their
//! `JsonSchema`), so the document follows the code; the table below adds
//! what types can't say: the routes, who may call them, and every status
//! with the error codes it carries. A test checks that each documented
//! operation is routed and that a documented path refuses other methods.

use super::ErrorResponse;
use super::health::{Health, Liveness, Readiness};
use super::presence::{BatchResponse, MultiGetQuery, MultiGetResponse};
use super::stream::StreamQuery;
use crate::cache::CacheStats;
use crate::model::{BatchRequest, MAX_SESSION_ID_BYTES, MAX_USER_ID_BYTES, SetPresenceRequest};
use crate::record::PresenceView;
use crate::session::HeartbeatRequest;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use schemars::generate::SchemaSettings;
use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde_json::{Map, Value, json};
use std::collections::BTreeMap;
use std::sync::LazyLock;

/// Where the service serves its own description.
pub const OPENAPI_PATH: &str = "/api/v2/openapi.json";

/// Makes the schema of one handler type, registering what it refers to.
pub type SchemaFn = fn(&mut SchemaGenerator) -> Schema;

fn schema<T: JsonSchema>(generator: &mut SchemaGenerator) -> Schema {
    generator.subschema_for::<T>()
}

/// Who may call an operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Auth {
    /// No token: probes and scrapers.
    None,
    /// Any valid token.
    AnyToken,
    /// A token for the user in the path, or one with scope `presence:write`.
    OwnUserOrWriteScope,
    /// A token with scope `presence:write`.
    WriteScope,
    /// Any valid token, in `Authorization` or (for browsers) `access_token`.
    AnyTokenHeaderOrQuery,
}

/// What a non-error answer carries.
#[derive(Debug, Clone, Copy)]
pub enum Body {
    /// JSON described by a handler type.
    Json(SchemaFn),
    /// JSON with no schema worth stating (this document itself).
    AnyJson,
    /// Text of this media type.
    Text(&'static str),
    /// Server-Sent Events.
    EventStream,
}

/// A non-error answer.
#[derive(Debug, Clone, Copy)]
pub struct Reply {
    pub status: u16,
    pub description: &'static str,
    pub body: Body,
}

/// A path parameter.
#[derive(Debug, Clone, Copy)]
pub struct PathParam {
    pub name: &'static str,
    pub description: &'static str,
    pub max_bytes: usize,
    /// Values that select a literal path instead (`batch`, `stream`).
    pub literal_paths: &'static [&'static str],
}

/// IDs are checked with `char::is_control`: C0, DEL and C1 are refused.
const NO_CONTROL_CHARACTERS: &str = "^[^\\u0000-\\u001F\\u007F-\\u009F]+$";

/// A request body.
#[derive(Debug, Clone, Copy)]
pub struct RequestBody {
    pub schema: SchemaFn,
    pub required: bool,
}

/// One method on one path.
#[derive(Debug, Clone, Copy)]
pub struct Operation {
    pub method: &'static str,
    /// The path as OpenAPI writes it (`{userID}`).
    pub path: &'static str,
    pub id: &'static str,
    pub tag: &'static str,
    pub summary: &'static str,
    pub description: &'static str,
    pub auth: Auth,
    pub path_params: &'static [PathParam],
    /// A type whose fields are the query parameters.
    pub query: Option<SchemaFn>,
    /// Whether the `Last-Event-ID` header is read.
    pub last_event_id: bool,
    pub request: Option<RequestBody>,
    pub replies: &'static [Reply],
    /// Error statuses and the codes each may carry; a status may be listed
    /// more than once. `503 too_many_connections` is added to every one.
    pub errors: &'static [(u16, &'static [&'static str])],
}

const USER_ID: PathParam = PathParam {
    name: "userID",
    description: "The user: 1 to 256 bytes of UTF-8 without control characters, \
        percent-encoded. The IDs `batch` and `stream` are served by those literal paths \
        (`GET` and `DELETE /api/v2/presence/batch`, `POST` and `DELETE \
        /api/v2/presence/stream`), as OpenAPI matches literal paths first.",
    max_bytes: MAX_USER_ID_BYTES,
    literal_paths: &["batch", "stream"],
};
/// The user of a session path: no literal route shares those paths, so
/// every ID, `batch` and `stream` included, goes through them.
const SESSION_USER_ID: PathParam = PathParam {
    name: "userID",
    description: "The user: 1 to 256 bytes of UTF-8 without control characters, \
        percent-encoded.",
    max_bytes: MAX_USER_ID_BYTES,
    literal_paths: &[],
};
const SESSION_ID: PathParam = PathParam {
    name: "sessionID",
    description: "The session, chosen by the client: 1 to 128 bytes without control characters.",
    max_bytes: MAX_SESSION_ID_BYTES,
    literal_paths: &[],
};

const UNAUTHORIZED: (u16, &[&str]) = (401, &["missing_token", "invalid_token", "token_expired"]);
const FORBIDDEN: (u16, &[&str]) = (403, &["forbidden"]);
const BAD_BODY: (u16, &[&str]) = (400, &["invalid_json", "invalid_body"]);
const TOO_LARGE: (u16, &[&str]) = (413, &["payload_too_large"]);
const SLOW_BODY: (u16, &[&str]) = (408, &["body_timeout"]);
const RATE_LIMITED: (u16, &[&str]) = (429, &["rate_limited"]);
const READ_FAILED: (u16, &[&str]) = (503, &["store_unavailable", "store_timeout"]);
const WRITE_FAILED: (u16, &[&str]) = (
    503,
    &["store_unavailable", "store_timeout", "write_conflict"],
);
const NOT_STORABLE: (u16, &[&str]) = (500, &["corrupt_record"]);
const PRESENCE_FIELDS: (u16, &[&str]) = (
    400,
    &["invalid_status", "message_too_long", "invalid_expires_at"],
);

const PRESENCE: Reply = Reply {
    status: 200,
    description: "The user's effective presence.",
    body: Body::Json(schema::<PresenceView>),
};

const SET_PRESENCE: RequestBody = RequestBody {
    schema: schema::<SetPresenceRequest>,
    required: true,
};

/// `DELETE` of a literal path shared with another route, for the user
/// whose ID is that path's last segment (`batch`, `stream`).
const fn clear_user_named(
    path: &'static str,
    id: &'static str,
    summary: &'static str,
    description: &'static str,
) -> Operation {
    Operation {
        method: "delete",
        path,
        id,
        tag: "presence",
        summary,
        description,
        auth: Auth::OwnUserOrWriteScope,
        path_params: &[],
        query: None,
        last_event_id: false,
        request: None,
        replies: &[PRESENCE],
        errors: &[
            UNAUTHORIZED,
            FORBIDDEN,
            (404, &["presence_not_found"]),
            RATE_LIMITED,
            NOT_STORABLE,
            WRITE_FAILED,
        ],
    }
}

/// Every operation of the API, in the order the docs list them.
pub const OPERATIONS: &[Operation] = &[
    Operation {
        method: "get",
        path: "/api/v2/presence/{userID}",
        id: "getPresence",
        tag: "presence",
        summary: "Read one presence",
        description: "Served from the node's cache, which follows the bucket.",
        auth: Auth::AnyToken,
        path_params: &[USER_ID],
        query: None,
        last_event_id: false,
        request: None,
        replies: &[PRESENCE],
        errors: &[
            (400, &["invalid_user_id"]),
            UNAUTHORIZED,
            (404, &["presence_not_found"]),
            READ_FAILED,
        ],
    },
    Operation {
        method: "post",
        path: "/api/v2/presence/{userID}",
        id: "setPresence",
        tag: "presence",
        summary: "Set a presence",
        description: "Sets the user's manual status; answers once the hub has stored it.",
        auth: Auth::OwnUserOrWriteScope,
        path_params: &[USER_ID],
        query: None,
        last_event_id: false,
        request: Some(SET_PRESENCE),
        replies: &[PRESENCE],
        errors: &[
            (400, &["invalid_user_id"]),
            BAD_BODY,
            PRESENCE_FIELDS,
            UNAUTHORIZED,
            FORBIDDEN,
            SLOW_BODY,
            TOO_LARGE,
            RATE_LIMITED,
            NOT_STORABLE,
            WRITE_FAILED,
        ],
    },
    Operation {
        method: "delete",
        path: "/api/v2/presence/{userID}",
        id: "clearPresence",
        tag: "presence",
        summary: "Clear a manual status",
        description: "Removes the user's manual status, as if it expired now: the status follows \
            the user's sessions again (offline without any), and `lastSeen` keeps the manual \
            status's time. Without a manual status nothing changes. Answers the presence once \
            the hub has stored the removal.",
        auth: Auth::OwnUserOrWriteScope,
        path_params: &[USER_ID],
        query: None,
        last_event_id: false,
        request: None,
        replies: &[PRESENCE],
        errors: &[
            (400, &["invalid_user_id"]),
            UNAUTHORIZED,
            FORBIDDEN,
            (404, &["presence_not_found"]),
            RATE_LIMITED,
            NOT_STORABLE,
            WRITE_FAILED,
        ],
    },
    Operation {
        method: "get",
        path: "/api/v2/presence",
        id: "getPresences",
        tag: "presence",
        summary: "Read up to 100 presences",
        description: "The found presences in request order, then the IDs that have none.",
        auth: Auth::AnyToken,
        path_params: &[],
        query: Some(schema::<MultiGetQuery>),
        last_event_id: false,
        request: None,
        replies: &[Reply {
            status: 200,
            description: "The presences found and the users without one.",
            body: Body::Json(schema::<MultiGetResponse>),
        }],
        errors: &[
            (
                400,
                &[
                    "invalid_query",
                    "missing_users",
                    "too_many_users",
                    "invalid_user_id",
                ],
            ),
            UNAUTHORIZED,
            READ_FAILED,
        ],
    },
    Operation {
        method: "post",
        path: "/api/v2/presence/batch",
        id: "setPresences",
        tag: "presence",
        summary: "Set up to 1000 presences",
        description: "Each item gets its own result; an item that fails does not fail the others. \
            When nothing could be stored at all, the answer is that store error.",
        auth: Auth::WriteScope,
        path_params: &[],
        query: None,
        last_event_id: false,
        request: Some(RequestBody {
            schema: schema::<BatchRequest>,
            required: true,
        }),
        replies: &[Reply {
            status: 200,
            description: "One result per item, in request order.",
            body: Body::Json(schema::<BatchResponse<'static>>),
        }],
        errors: &[
            BAD_BODY,
            UNAUTHORIZED,
            FORBIDDEN,
            SLOW_BODY,
            TOO_LARGE,
            (413, &["batch_too_large"]),
            NOT_STORABLE,
            WRITE_FAILED,
        ],
    },
    Operation {
        method: "get",
        path: "/api/v2/presence/batch",
        id: "getPresenceOfUserBatch",
        tag: "presence",
        summary: "Read the presence of the user named `batch`",
        description: "`GET /api/v2/presence/{userID}` for the user ID `batch`, whose path \
            is shared with the batch set.",
        auth: Auth::AnyToken,
        path_params: &[],
        query: None,
        last_event_id: false,
        request: None,
        replies: &[PRESENCE],
        errors: &[UNAUTHORIZED, (404, &["presence_not_found"]), READ_FAILED],
    },
    clear_user_named(
        "/api/v2/presence/batch",
        "clearPresenceOfUserBatch",
        "Clear the manual status of the user named `batch`",
        "`DELETE /api/v2/presence/{userID}` for the user ID `batch`, whose path is shared \
            with the batch set.",
    ),
    Operation {
        method: "put",
        path: "/api/v2/presence/{userID}/sessions/{sessionID}",
        id: "heartbeatSession",
        tag: "sessions",
        summary: "Start or refresh a session",
        description: "Starts the session's lease or extends it by `ttlSeconds`; send it about every \
            ttlSeconds/3. The body may be empty.",
        auth: Auth::OwnUserOrWriteScope,
        path_params: &[SESSION_USER_ID, SESSION_ID],
        query: None,
        last_event_id: false,
        request: Some(RequestBody {
            schema: schema::<HeartbeatRequest>,
            required: false,
        }),
        replies: &[PRESENCE],
        errors: &[
            (
                400,
                &[
                    "invalid_path",
                    "invalid_user_id",
                    "invalid_session_id",
                    "invalid_status",
                    "invalid_ttl",
                    "device_too_long",
                ],
            ),
            BAD_BODY,
            UNAUTHORIZED,
            FORBIDDEN,
            (409, &["too_many_sessions"]),
            SLOW_BODY,
            TOO_LARGE,
            RATE_LIMITED,
            NOT_STORABLE,
            WRITE_FAILED,
        ],
    },
    Operation {
        method: "delete",
        path: "/api/v2/presence/{userID}/sessions/{sessionID}",
        id: "endSession",
        tag: "sessions",
        summary: "End a session",
        description: "Ends the session at once (log out, tab closed).",
        auth: Auth::OwnUserOrWriteScope,
        path_params: &[SESSION_USER_ID, SESSION_ID],
        query: None,
        last_event_id: false,
        request: None,
        replies: &[PRESENCE],
        errors: &[
            (
                400,
                &["invalid_path", "invalid_user_id", "invalid_session_id"],
            ),
            UNAUTHORIZED,
            FORBIDDEN,
            (404, &["session_not_found"]),
            RATE_LIMITED,
            NOT_STORABLE,
            WRITE_FAILED,
        ],
    },
    Operation {
        method: "get",
        path: "/api/v2/presence/stream",
        id: "streamPresences",
        tag: "stream",
        summary: "Follow presences (Server-Sent Events)",
        description: "Events `presence` (data: a Presence), `snapshot-end`, and a last `error` \
            before the node ends the stream. Event IDs are KV revisions: reconnect with \
            `Last-Event-ID` (or `lastEventId`) to resume. The stream does not end by itself.",
        auth: Auth::AnyTokenHeaderOrQuery,
        path_params: &[],
        query: Some(schema::<StreamQuery>),
        last_event_id: true,
        request: None,
        replies: &[Reply {
            status: 200,
            description: "The stream: the users' current state (or what changed since \
                Last-Event-ID), `snapshot-end`, then every change.",
            body: Body::EventStream,
        }],
        errors: &[
            (
                400,
                &[
                    "invalid_query",
                    "missing_users",
                    "too_many_users",
                    "invalid_user_id",
                    "invalid_last_event_id",
                    "multiple_tokens",
                ],
            ),
            UNAUTHORIZED,
            (429, &["too_many_streams_for_caller"]),
            (
                503,
                &["too_many_streams", "too_many_follows", "stream_lagged"],
            ),
            READ_FAILED,
        ],
    },
    Operation {
        method: "post",
        path: "/api/v2/presence/stream",
        id: "setPresenceOfUserStream",
        tag: "presence",
        summary: "Set the presence of the user named `stream`",
        description: "`POST /api/v2/presence/{userID}` for the user ID `stream`, whose path \
            is shared with the change stream.",
        auth: Auth::OwnUserOrWriteScope,
        path_params: &[],
        query: None,
        last_event_id: false,
        request: Some(SET_PRESENCE),
        replies: &[PRESENCE],
        errors: &[
            BAD_BODY,
            PRESENCE_FIELDS,
            UNAUTHORIZED,
            FORBIDDEN,
            SLOW_BODY,
            TOO_LARGE,
            RATE_LIMITED,
            NOT_STORABLE,
            WRITE_FAILED,
        ],
    },
    clear_user_named(
        "/api/v2/presence/stream",
        "clearPresenceOfUserStream",
        "Clear the manual status of the user named `stream`",
        "`DELETE /api/v2/presence/{userID}` for the user ID `stream`, whose path is shared \
            with the change stream.",
    ),
    Operation {
        method: "get",
        path: "/api/v2/cache/metrics",
        id: "getCacheMetrics",
        tag: "metrics",
        summary: "Cache statistics",
        description: "The Go service's cache statistics, for people.",
        auth: Auth::AnyToken,
        path_params: &[],
        query: None,
        last_event_id: false,
        request: None,
        replies: &[Reply {
            status: 200,
            description: "This node's cache statistics.",
            body: Body::Json(schema::<CacheStats>),
        }],
        errors: &[UNAUTHORIZED],
    },
    Operation {
        method: "get",
        path: "/health/liveness",
        id: "getLiveness",
        tag: "health",
        summary: "Liveness probe",
        description: "The process is up and its HTTP loop runs.",
        auth: Auth::None,
        path_params: &[],
        query: None,
        last_event_id: false,
        request: None,
        replies: &[Reply {
            status: 200,
            description: "Alive.",
            body: Body::Json(schema::<Liveness>),
        }],
        errors: &[],
    },
    Operation {
        method: "get",
        path: "/health/readiness",
        id: "getReadiness",
        tag: "health",
        summary: "Readiness probe",
        description: "Ready while the node's NATS is connected, the bucket is open and the watch \
            runs. A leaf cut off from the hub stays ready: cached reads work.",
        auth: Auth::None,
        path_params: &[],
        query: None,
        last_event_id: false,
        request: None,
        replies: &[
            Reply {
                status: 200,
                description: "Ready.",
                body: Body::Json(schema::<Readiness>),
            },
            Reply {
                status: 503,
                description: "Not ready, and why.",
                body: Body::Json(schema::<Readiness>),
            },
        ],
        errors: &[],
    },
    Operation {
        method: "get",
        path: "/health",
        id: "getHealth",
        tag: "health",
        summary: "Readiness with detail",
        description: "Readiness plus NATS, KV (asked of the hub now), watch and cache detail.",
        auth: Auth::None,
        path_params: &[],
        query: None,
        last_event_id: false,
        request: None,
        replies: &[
            Reply {
                status: 200,
                description: "Ready (`ok`, or `degraded` when the hub does not answer now).",
                body: Body::Json(schema::<Health>),
            },
            Reply {
                status: 503,
                description: "Not ready (`unavailable`).",
                body: Body::Json(schema::<Health>),
            },
        ],
        errors: &[],
    },
    Operation {
        method: "get",
        path: "/metrics",
        id: "getMetrics",
        tag: "metrics",
        summary: "Prometheus metrics",
        description: "Prometheus text format, for in-cluster scrapers.",
        auth: Auth::None,
        path_params: &[],
        query: None,
        last_event_id: false,
        request: None,
        replies: &[Reply {
            status: 200,
            description: "Every metric of this node.",
            body: Body::Text("text/plain"),
        }],
        errors: &[(500, &["metrics_unavailable"])],
    },
    Operation {
        method: "get",
        path: OPENAPI_PATH,
        id: "getOpenApi",
        tag: "meta",
        summary: "This description",
        description: "The OpenAPI 3.1 description of this API (also `docs/openapi.json`).",
        auth: Auth::None,
        path_params: &[],
        query: None,
        last_event_id: false,
        request: None,
        replies: &[Reply {
            status: 200,
            description: "The OpenAPI document.",
            body: Body::AnyJson,
        }],
        errors: &[],
    },
];

/// Answered by the connection limit before any route runs.
const EVERY_OPERATION: (u16, &[&str]) = (503, &["too_many_connections"]);

/// Generators for request types (as they deserialize) and for answers (as
/// they serialize), both filing named schemas under `components/schemas`.
struct Generators {
    requests: SchemaGenerator,
    answers: SchemaGenerator,
}

impl Generators {
    fn new() -> Self {
        let settings = SchemaSettings::draft2020_12().with(|s| {
            s.definitions_path = "/components/schemas".into();
            s.meta_schema = None;
        });
        Generators {
            requests: settings.clone().for_deserialize().into_generator(),
            answers: settings.for_serialize().into_generator(),
        }
    }

    /// Every named schema; a name both generators made must mean the same.
    fn into_components(mut self) -> Result<Map<String, Value>, String> {
        let mut all = self.answers.take_definitions(true);
        for (name, request_schema) in self.requests.take_definitions(true) {
            match all.get(&name) {
                Some(answer_schema) if *answer_schema != request_schema => {
                    return Err(format!(
                        "schema {name} differs between requests and answers"
                    ));
                }
                _ => {
                    all.insert(name, request_schema);
                }
            }
        }
        Ok(all)
    }
}

fn path_parameter(param: &PathParam) -> Value {
    let mut value_schema = json!({
        "type": "string",
        "minLength": 1,
        "maxLength": param.max_bytes,
        "pattern": NO_CONTROL_CHARACTERS,
    });
    if !param.literal_paths.is_empty() {
        value_schema["not"] = json!({"enum": param.literal_paths});
    }
    json!({
        "name": param.name,
        "in": "path",
        "required": true,
        "description": param.description,
        "schema": value_schema,
    })
}

/// The query parameters of a type: one per property, `required` as the
/// type says.
fn query_parameters(query: SchemaFn, generator: &mut SchemaGenerator) -> Vec<Value> {
    let schema = query(generator);
    let resolved = match schema.get("$ref").and_then(Value::as_str) {
        Some(reference) => {
            let name = reference.rsplit('/').next().unwrap_or_default();
            generator
                .definitions_mut()
                .remove(name)
                .unwrap_or(Value::Null)
        }
        None => schema.to_value(),
    };
    let required: Vec<&str> = resolved["required"]
        .as_array()
        .map(|names| names.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let Some(properties) = resolved["properties"].as_object() else {
        return Vec::new();
    };
    properties
        .iter()
        .map(|(name, property)| {
            let mut value_schema = property.clone();
            let description = value_schema
                .as_object_mut()
                .and_then(|o| o.remove("description"))
                .unwrap_or(Value::Null);
            json!({
                "name": name,
                "in": "query",
                "required": required.contains(&name.as_str()),
                "description": description,
                "schema": value_schema,
            })
        })
        .collect()
}

fn last_event_id_parameter() -> Value {
    json!({
        "name": "Last-Event-ID",
        "in": "header",
        "required": false,
        "description": "Resume after this event ID (sent by EventSource when it reconnects).",
        "schema": {"type": "string", "pattern": "^\\s*[0-9]*\\s*$"},
    })
}

fn parameters(op: &Operation, generators: &mut Generators) -> Vec<Value> {
    let mut params: Vec<Value> = op.path_params.iter().map(path_parameter).collect();
    if let Some(query) = op.query {
        params.extend(query_parameters(query, &mut generators.requests));
    }
    if op.last_event_id {
        params.push(last_event_id_parameter());
    }
    params
}

fn content(body: Body, generator: &mut SchemaGenerator) -> Value {
    match body {
        Body::Json(schema) => json!({"application/json": {"schema": schema(generator)}}),
        Body::AnyJson => json!({"application/json": {"schema": {"type": "object"}}}),
        Body::Text(media_type) => json!({ media_type: {"schema": {"type": "string"}} }),
        Body::EventStream => json!({"text/event-stream": {"schema": {"type": "string"}}}),
    }
}

/// An error answer whose `code` is one of `codes`.
fn error_schema(codes: &[&str], generator: &mut SchemaGenerator) -> Value {
    json!({
        "allOf": [
            schema::<ErrorResponse>(generator),
            {"properties": {"error": {"properties": {"code": {"enum": codes}}}}},
        ]
    })
}

fn reason(status: u16) -> &'static str {
    StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Error")
}

/// Each error status once, with every code it may carry, in order.
fn error_codes(op: &Operation) -> BTreeMap<u16, Vec<&'static str>> {
    let mut by_status: BTreeMap<u16, Vec<&'static str>> = BTreeMap::new();
    for (status, codes) in op.errors.iter().chain([&EVERY_OPERATION]) {
        let entry = by_status.entry(*status).or_default();
        for code in *codes {
            if !entry.contains(code) {
                entry.push(code);
            }
        }
    }
    by_status
}

fn error_response(status: u16, codes: &[&str], generator: &mut SchemaGenerator) -> Value {
    let list = codes
        .iter()
        .map(|c| format!("`{c}`"))
        .collect::<Vec<_>>()
        .join(", ");
    let mut response = json!({
        "description": format!("{}: {list}.", reason(status)),
        "content": {"application/json": {"schema": error_schema(codes, generator)}},
    });
    let mut headers = Map::new();
    if status == 429 || status == 503 {
        headers.insert(
            "Retry-After".into(),
            json!({"description": "Seconds to wait, when the code calls for it.", "schema": {"type": "integer", "minimum": 1}}),
        );
    }
    if status == 401 {
        headers.insert(
            "WWW-Authenticate".into(),
            json!({"schema": {"type": "string"}}),
        );
    }
    if !headers.is_empty() {
        response["headers"] = Value::Object(headers);
    }
    response
}

fn responses(op: &Operation, generator: &mut SchemaGenerator) -> Map<String, Value> {
    let mut responses = Map::new();
    let mut errors = error_codes(op);
    for reply in op.replies {
        let mut schema = content(reply.body, generator);
        // The same status as an error too (a probe's 503): either body.
        if let Some(codes) = errors.remove(&reply.status)
            && let Some(ok) = schema.pointer_mut("/application~1json/schema")
        {
            *ok = json!({"anyOf": [ok.take(), error_schema(&codes, generator)]});
        }
        responses.insert(
            reply.status.to_string(),
            json!({"description": reply.description, "content": schema}),
        );
    }
    for (status, codes) in errors {
        responses.insert(
            status.to_string(),
            error_response(status, &codes, generator),
        );
    }
    responses
}

fn auth_text(auth: Auth) -> &'static str {
    match auth {
        Auth::None => "No token.",
        Auth::AnyToken => "Any valid token.",
        Auth::OwnUserOrWriteScope => {
            "A token for this user (`sub`), or any token with scope `presence:write`."
        }
        Auth::WriteScope => "A token with scope `presence:write`.",
        Auth::AnyTokenHeaderOrQuery => {
            "Any valid token, in `Authorization` or, for browsers, as `access_token`."
        }
    }
}

fn security(auth: Auth) -> Value {
    match auth {
        Auth::None => json!([]),
        Auth::AnyTokenHeaderOrQuery => json!([{"bearerAuth": []}, {"accessToken": []}]),
        _ => json!([{"bearerAuth": []}]),
    }
}

fn operation(op: &Operation, generators: &mut Generators) -> Value {
    let mut value = json!({
        "operationId": op.id,
        "tags": [op.tag],
        "summary": op.summary,
        "description": format!("{}\n\nAuth: {}", op.description, auth_text(op.auth)),
        "security": security(op.auth),
    });
    let params = parameters(op, generators);
    if !params.is_empty() {
        value["parameters"] = Value::Array(params);
    }
    if let Some(body) = op.request {
        value["requestBody"] = json!({
            "required": body.required,
            "content": {"application/json": {"schema": (body.schema)(&mut generators.requests)}},
        });
    }
    value["responses"] = Value::Object(responses(op, &mut generators.answers));
    value
}

fn info() -> Value {
    json!({
        "title": "presence-service",
        "version": env!("CARGO_PKG_VERSION"),
        "summary": "Who is online, away, busy or offline, with a status message and last-seen time.",
        "description": "The HTTP API of PresenceCluster's data plane. Every error is \
            `{\"error\": {\"code\", \"message\"}}` with a stable code; docs/api.md says when each \
            occurs. Tokens are HS256 JWTs.",
        "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"},
    })
}

fn security_schemes() -> Value {
    json!({
        "bearerAuth": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"},
        "accessToken": {
            "type": "apiKey",
            "in": "query",
            "name": "access_token",
            "description": "The stream only, for browsers whose EventSource can't send headers (RFC 6750 §2.3).",
        },
    })
}

/// The whole OpenAPI document.
pub fn document() -> Value {
    let mut generators = Generators::new();
    let mut paths: BTreeMap<&str, Map<String, Value>> = BTreeMap::new();
    for op in OPERATIONS {
        let value = operation(op, &mut generators);
        paths
            .entry(op.path)
            .or_default()
            .insert(op.method.into(), value);
    }
    // Two types with one name would be a bug the tests catch; the document
    // still names every schema it refers to.
    let schemas = generators.into_components().unwrap_or_else(|err| {
        tracing::error!(%err, "OpenAPI schemas disagree");
        Map::new()
    });
    json!({
        "openapi": "3.1.0",
        "info": info(),
        "tags": [
            {"name": "presence", "description": "Read and set presences."},
            {"name": "sessions", "description": "Heartbeat sessions that make a user online while they live."},
            {"name": "stream", "description": "Follow presences as they change."},
            {"name": "health", "description": "Probes."},
            {"name": "metrics", "description": "Metrics."},
            {"name": "meta", "description": "This description."},
        ],
        "security": [{"bearerAuth": []}],
        "paths": paths,
        "components": {"schemas": schemas, "securitySchemes": security_schemes()},
    })
}

/// The document as served and committed: pretty JSON and a final newline.
pub fn document_text() -> String {
    let mut text = serde_json::to_string_pretty(&document()).unwrap_or_default();
    text.push('\n');
    text
}

static DOCUMENT: LazyLock<String> = LazyLock::new(document_text);

/// `GET /api/v2/openapi.json` (no auth).
pub async fn serve() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        DOCUMENT.as_str(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_answers_agree_on_every_shared_schema_name() {
        let mut generators = Generators::new();
        for op in OPERATIONS {
            operation(op, &mut generators);
        }
        let components = generators.into_components();
        assert!(components.is_ok(), "{components:?}");
    }

    #[test]
    fn every_reference_resolves() {
        let doc = document();
        let text = doc.to_string();
        let schemas = doc["components"]["schemas"].as_object().cloned();
        let schemas = schemas.unwrap_or_default();
        for reference in text.split("\"$ref\":\"").skip(1) {
            let target = reference.split('"').next().unwrap_or_default();
            let name = target.trim_start_matches("#/components/schemas/");
            assert!(schemas.contains_key(name), "dangling {target}");
        }
    }

    #[test]
    fn operation_ids_are_unique_and_every_operation_answers_errors_as_json() {
        let mut ids: Vec<&str> = OPERATIONS.iter().map(|op| op.id).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), OPERATIONS.len());
        let doc = document();
        for op in OPERATIONS {
            let responses = &doc["paths"][op.path][op.method]["responses"];
            assert!(responses["503"].is_object(), "{} has no 503", op.id);
            if op.auth != Auth::None {
                assert!(responses["401"].is_object(), "{} has no 401", op.id);
            }
        }
    }

    /// A user named `batch` or `stream` is excluded only where a literal
    /// route shares the path; elsewhere (its sessions) a generated client
    /// must let it through, as the router does.
    #[test]
    fn only_the_paths_a_literal_route_shares_exclude_the_literal_ids() {
        let doc = document();
        for op in OPERATIONS {
            let params = &doc["paths"][op.path][op.method]["parameters"];
            for param in params.as_array().into_iter().flatten() {
                let excludes = !param["schema"]["not"].is_null();
                let shared = op.path == "/api/v2/presence/{userID}";
                assert_eq!(excludes, shared, "{} {}", op.id, param["name"]);
            }
        }
    }

    /// `UPDATE_GOLDEN=1 cargo test -p presence-dataplane openapi` rewrites it.
    #[test]
    fn committed_docs_openapi_json_is_current() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/openapi.json");
        let current = document_text();
        if std::env::var_os("UPDATE_GOLDEN").is_some() {
            std::fs::write(&path, &current).expect("write docs/openapi.json");
        }
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == current,
            "docs/openapi.json is stale: run UPDATE_GOLDEN=1 cargo test -p presence-dataplane openapi"
        );
    }
}

//! `/api/v2/presence` handlers.

use super::{ApiError, ErrorBody, JsonBody, RawJson, StrictQuery, UserIdPath};
use crate::AppState;
use crate::auth::Caller;
use crate::cache::KeyHasher;
use crate::model::{
    BatchItem, BatchRequest, MAX_BATCH, SetPresenceRequest, ValidUpdate, validate_update,
    validate_user_id,
};
use crate::record::PresenceView;
use crate::store::StoreError;
use axum::Json;
use axum::extract::{FromRequest, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use time::OffsetDateTime;

/// Most users one multi-get may ask for.
pub const MAX_MULTI_GET: usize = 100;

fn not_found(user_id: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "presence_not_found",
        format!("no presence is stored for user {user_id:?}"),
    )
}

/// A caller may write only its own presence (and sessions) unless its
/// token has scope `presence:write`.
pub(super) fn forbidden(user_id: &str) -> ApiError {
    ApiError::new(
        StatusCode::FORBIDDEN,
        "forbidden",
        format!(
            "this token may only set its own presence, not {user_id:?}; setting others' needs scope presence:write"
        ),
    )
}

pub(super) async fn lookup(state: &AppState, user_id: &str) -> Result<RawJson, ApiError> {
    validate_user_id(user_id)?;
    match state.service.get_json(user_id).await? {
        Some(json) => Ok(RawJson(json)),
        None => Err(not_found(user_id)),
    }
}

/// `GET /api/v2/presence/{userID}`. The front (`api/front.rs`) answers
/// most of these itself through the same steps: a change here belongs
/// there too (its test holds the two answers equal).
pub async fn get_one(
    State(state): State<AppState>,
    _caller: Caller,
    UserIdPath(user_id): UserIdPath,
) -> Result<RawJson, ApiError> {
    lookup(&state, &user_id).await
}

/// `GET /api/v2/presence/batch`: the route is shared with batch set, so a
/// user whose ID is literally `batch` is still readable.
pub async fn get_user_named_batch(
    State(state): State<AppState>,
    _caller: Caller,
) -> Result<RawJson, ApiError> {
    lookup(&state, "batch").await
}

/// `POST /api/v2/presence/{userID}`: a caller sets its own presence, or
/// anyone's with scope `presence:write`.
pub async fn set_one(
    State(state): State<AppState>,
    caller: Caller,
    UserIdPath(user_id): UserIdPath,
    JsonBody(request): JsonBody<SetPresenceRequest>,
) -> Result<Json<PresenceView>, ApiError> {
    store_manual(&state, &caller, &user_id, request).await
}

/// `DELETE /api/v2/presence/{userID}`: clears the user's manual status, so
/// its status follows its sessions again (offline without any); the same
/// callers as a set may.
pub async fn clear_one(
    State(state): State<AppState>,
    caller: Caller,
    UserIdPath(user_id): UserIdPath,
) -> Result<Json<PresenceView>, ApiError> {
    clear_manual(&state, &caller, &user_id).await
}

/// `DELETE /api/v2/presence/batch` and `.../stream`: those routes are
/// shared with the batch set and the change stream, so users whose IDs
/// are literally `batch` or `stream` can still clear their status.
pub async fn clear_user_named_batch(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<PresenceView>, ApiError> {
    clear_manual(&state, &caller, "batch").await
}

/// See [`clear_user_named_batch`].
pub async fn clear_user_named_stream(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<PresenceView>, ApiError> {
    clear_manual(&state, &caller, "stream").await
}

async fn clear_manual(
    state: &AppState,
    caller: &Caller,
    user_id: &str,
) -> Result<Json<PresenceView>, ApiError> {
    check_writer(caller, user_id)?;
    check_limit(state, user_id)?;
    match state.service.clear(user_id).await? {
        Some(view) => Ok(Json(view)),
        None => Err(not_found(user_id)),
    }
}

/// `POST /api/v2/presence/stream`: the route is shared with the change
/// stream (a `GET`), so a user whose ID is literally `stream` can still set
/// its presence.
pub async fn set_user_named_stream(
    State(state): State<AppState>,
    caller: Caller,
    JsonBody(request): JsonBody<SetPresenceRequest>,
) -> Result<Json<PresenceView>, ApiError> {
    store_manual(&state, &caller, "stream", request).await
}

async fn store_manual(
    state: &AppState,
    caller: &Caller,
    user_id: &str,
    request: SetPresenceRequest,
) -> Result<Json<PresenceView>, ApiError> {
    check_writer(caller, user_id)?;
    let update = validate_update(user_id, request, OffsetDateTime::now_utc())?;
    check_limit(state, user_id)?;
    Ok(Json(state.service.set(update).await?))
}

/// A manual-status write's first checks: the ID, then the caller's right
/// to write that user.
fn check_writer(caller: &Caller, user_id: &str) -> Result<(), ApiError> {
    validate_user_id(user_id)?;
    if caller.may_write(user_id) {
        Ok(())
    } else {
        Err(forbidden(user_id))
    }
}

/// Takes a token of the user's write limit; the last check before a write,
/// so a refused request costs none.
fn check_limit(state: &AppState, user_id: &str) -> Result<(), ApiError> {
    state
        .limiter
        .check(user_id)
        .map_err(|wait| ApiError::rate_limited(user_id, wait))
}

/// Query of the multi-get.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct MultiGetQuery {
    /// Up to 100 comma-separated user IDs (duplicates count once).
    #[schemars(with = "String", length(min = 1))]
    users: Option<String>,
}

// `multi_get_body` writes this from cached JSON; the type describes it
// (OpenAPI), and a test checks that the two agree.
/// Answer of the multi-get: found presences in request order, then the IDs
/// that have none.
#[derive(Debug, Serialize, schemars::JsonSchema)]
#[cfg_attr(not(test), allow(dead_code))]
pub struct MultiGetResponse {
    presences: Vec<PresenceView>,
    #[serde(rename = "notFound")]
    not_found: Vec<String>,
}

/// One item of the batch answer.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct BatchItemResult<'a> {
    #[serde(rename = "userID")]
    user_id: &'a str,
    ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    presence: Option<PresenceView>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<ErrorBody>,
}

/// Answer of the batch set.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct BatchResponse<'a> {
    results: Vec<BatchItemResult<'a>>,
    succeeded: usize,
    failed: usize,
}

/// `GET /api/v2/presence?users=a,b,c`: the found presences and the IDs with none.
pub async fn get_many(
    State(state): State<AppState>,
    _caller: Caller,
    StrictQuery(query): StrictQuery<MultiGetQuery>,
) -> Result<RawJson, ApiError> {
    let ids = parse_user_list(query.users.as_deref(), MAX_MULTI_GET)?;
    let results = state.service.get_many_json(&ids).await;
    let mut presences = Vec::with_capacity(ids.len());
    let mut missing = Vec::new();
    for (id, result) in ids.into_iter().zip(results) {
        match result? {
            Some(presence) => presences.push(presence),
            None => missing.push(id),
        }
    }
    Ok(RawJson(multi_get_body(&presences, &missing)))
}

/// The multi-get's [`MultiGetResponse`] from each presence's JSON: a
/// concatenation, as the presences are serialized already.
fn multi_get_body(presences: &[bytes::Bytes], not_found: &[&str]) -> bytes::Bytes {
    let size: usize = presences.iter().map(|p| p.len() + 1).sum();
    let mut body = Vec::with_capacity(size + 32 + not_found.len() * 16);
    body.extend_from_slice(b"{\"presences\":[");
    for (i, presence) in presences.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(presence);
    }
    body.extend_from_slice(b"],\"notFound\":[");
    for (i, id) in not_found.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        // A string always serializes.
        let _ = serde_json::to_writer(&mut body, id);
    }
    body.extend_from_slice(b"]}");
    body.into()
}

/// Reads `?users=a,b,c`: trimmed, deduplicated, validated, at most `max`.
/// Stops reading at the first ID past `max`. The IDs borrow from `raw`: a
/// multi-get copies none of them.
pub(super) fn parse_user_list(raw: Option<&str>, max: usize) -> Result<Vec<&str>, ApiError> {
    let mut seen = HashSet::with_capacity_and_hasher(max.min(1024) + 1, KeyHasher::new());
    let ids: Vec<&str> = raw
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|id| !id.is_empty())
        .filter(|id| seen.insert(*id))
        .take(max.saturating_add(1))
        .collect();
    if ids.is_empty() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "missing_users",
            "pass the users as ?users=a,b,c",
        ));
    }
    if ids.len() > max {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "too_many_users",
            format!("at most {max} distinct users per request; got more"),
        ));
    }
    for id in &ids {
        validate_user_id(id)?;
    }
    Ok(ids)
}

/// `POST /api/v2/presence/batch`: needs scope `presence:write`, checked
/// before the body (up to 1 MiB) is read or parsed; every item gets its own
/// result, and valid items are written concurrently.
pub async fn set_batch(
    State(state): State<AppState>,
    caller: Caller,
    body: axum::extract::Request,
) -> Result<Response, ApiError> {
    if !caller.can_write_any {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "batch set needs a token with scope presence:write",
        ));
    }
    let JsonBody(request) = JsonBody::<BatchRequest>::from_request(body, &state).await?;
    write_batch(&state, request).await
}

/// Each item's outcome so far: `None` for one still to be written.
type Outcomes = Vec<Option<Result<PresenceView, ApiError>>>;

async fn write_batch(state: &AppState, request: BatchRequest) -> Result<Response, ApiError> {
    if request.presences.count > MAX_BATCH {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "batch_too_large",
            format!(
                "at most {MAX_BATCH} presences per batch; got {}",
                request.presences.count
            ),
        ));
    }
    let (items, unreadable): (Vec<BatchItem>, Vec<Option<ApiError>>) = request
        .presences
        .kept
        .iter()
        .map(|raw| read_item(raw))
        .unzip();
    let now = OffsetDateTime::now_utc();
    let checked: Vec<Result<ValidUpdate, ApiError>> = items
        .iter()
        .zip(unreadable)
        .map(|(item, unreadable)| match unreadable {
            Some(err) => Err(err),
            None => {
                validate_update(item_user_id(item), item.request(), now).map_err(ApiError::from)
            }
        })
        .collect();
    let (mut outcomes, to_write) = plan_batch(state, &items, checked);
    let (indexes, updates): (Vec<usize>, Vec<ValidUpdate>) = to_write.into_iter().unzip();
    let written = state.service.set_many(updates).await;
    let mut first_store_error: Option<ApiError> = None;
    let mut store_failures = 0;
    for (i, result) in indexes.into_iter().zip(written) {
        let outcome = result.map_err(|e: StoreError| {
            store_failures += 1;
            ApiError::from(e)
        });
        if let Err(err) = &outcome {
            first_store_error.get_or_insert_with(|| err.clone());
        }
        outcomes[i] = Some(outcome);
    }
    // Nothing could be written at all: say so with the status code too.
    if store_failures == outcomes.len()
        && let Some(err) = first_store_error
    {
        return Err(err);
    }
    Ok(Json(batch_answer(&items, outcomes)).into_response())
}

/// Which checked items to write, as if the items were written one by one:
/// a user's last valid item is what stays, so only it is written (the
/// earlier valid ones are `superseded`), and an invalid item replaces
/// nothing. Each written item takes its user's rate-limit token.
fn plan_batch(
    state: &AppState,
    items: &[BatchItem],
    checked: Vec<Result<ValidUpdate, ApiError>>,
) -> (Outcomes, Vec<(usize, ValidUpdate)>) {
    let mut last_valid: HashMap<&str, usize> = HashMap::new();
    for (i, (item, checked)) in items.iter().zip(&checked).enumerate() {
        if checked.is_ok() {
            last_valid.insert(item_user_id(item), i);
        }
    }
    let mut outcomes: Outcomes = Vec::with_capacity(items.len());
    let mut to_write = Vec::new();
    for (i, (item, checked)) in items.iter().zip(checked).enumerate() {
        let user_id = item_user_id(item);
        match checked {
            Err(err) => outcomes.push(Some(Err(err))),
            Ok(_) if last_valid.get(user_id) != Some(&i) => outcomes.push(Some(Err(ApiError::new(
                StatusCode::CONFLICT,
                "superseded",
                "a later valid item in this batch sets the same user; only the last one is written",
            )))),
            Ok(update) => match state.limiter.check(user_id) {
                Ok(()) => {
                    to_write.push((i, update));
                    outcomes.push(None);
                }
                Err(wait) => outcomes.push(Some(Err(ApiError::rate_limited(user_id, wait)))),
            },
        }
    }
    (outcomes, to_write)
}

/// The batch's answer: one result per item, in input order, and the counts.
fn batch_answer(items: &[BatchItem], outcomes: Outcomes) -> BatchResponse<'_> {
    let results: Vec<BatchItemResult<'_>> = items
        .iter()
        .zip(outcomes)
        .map(|(item, outcome)| {
            let user_id = item_user_id(item);
            match outcome.unwrap_or_else(|| Err(missing_outcome())) {
                Ok(presence) => BatchItemResult {
                    user_id,
                    ok: true,
                    presence: Some(presence),
                    error: None,
                },
                Err(err) => BatchItemResult {
                    user_id,
                    ok: false,
                    presence: None,
                    error: Some(ErrorBody {
                        code: err.code,
                        message: err.message,
                    }),
                },
            }
        })
        .collect();
    let succeeded = results.iter().filter(|r| r.ok).count();
    BatchResponse {
        failed: results.len() - succeeded,
        succeeded,
        results,
    }
}

fn item_user_id(item: &BatchItem) -> &str {
    item.user_id.as_deref().unwrap_or_default()
}

/// One batch item read from its JSON text; an item that isn't a presence
/// object comes with its own `invalid_json` error, under its `userID` when
/// one can be found in it.
fn read_item(raw: &serde_json::value::RawValue) -> (BatchItem, Option<ApiError>) {
    match serde_json::from_str::<BatchItem>(raw.get()) {
        Ok(item) => (item, None),
        Err(err) => {
            let user_id = serde_json::from_str::<serde_json::Value>(raw.get())
                .ok()
                .and_then(|value| value.get("userID")?.as_str().map(str::to_owned));
            let item = BatchItem {
                user_id,
                ..BatchItem::default()
            };
            let message = format!("this item is not a valid presence: {err}");
            let err = ApiError::new(StatusCode::BAD_REQUEST, "invalid_json", message);
            (item, Some(err))
        }
    }
}

/// Every written item gets its outcome from `set_many`; this is unreachable
/// but answered honestly rather than with a panic.
fn missing_outcome() -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal_error",
        "item was not processed",
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Status;

    fn view(user: &str, message: &str) -> PresenceView {
        PresenceView {
            message: message.into(),
            status: Status::Busy,
            ..PresenceView::unknown(user)
        }
    }

    #[test]
    fn the_multi_get_body_is_what_serde_would_write() {
        let cases: [(Vec<PresenceView>, Vec<String>); 4] = [
            (vec![], vec![]),
            (vec![view("ann", "hi \"there\"")], vec![]),
            (vec![], vec!["gh\"ost".into(), "bob\n".into()]),
            (vec![view("ann", "a"), view("ünï", "b")], vec!["x".into()]),
        ];
        for (presences, not_found) in cases {
            let rendered: Vec<bytes::Bytes> = presences
                .iter()
                .map(|p| serde_json::to_vec(p).expect("view").into())
                .collect();
            let ids: Vec<&str> = not_found.iter().map(String::as_str).collect();
            let ours = multi_get_body(&rendered, &ids);
            let serde = serde_json::to_vec(&MultiGetResponse {
                presences,
                not_found,
            })
            .expect("response");
            assert_eq!(
                String::from_utf8_lossy(&ours),
                String::from_utf8_lossy(&serde)
            );
        }
    }
}

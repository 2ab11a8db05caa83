//! `/api/v2/presence/{userID}/sessions/{sessionID}`: heartbeat sessions.

use super::presence::forbidden;
use super::{ApiError, JsonBodyOrEmpty, SessionPath};
use crate::AppState;
use crate::auth::Caller;
use crate::model::validate_user_id;
use crate::record::PresenceView;
use crate::service::SessionError;
use crate::session::{HeartbeatRequest, validate_heartbeat, validate_session_id};
use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;

impl From<SessionError> for ApiError {
    fn from(err: SessionError) -> Self {
        match err {
            SessionError::Store(err) => err.into(),
            SessionError::TooManySessions(_) => {
                ApiError::new(StatusCode::CONFLICT, "too_many_sessions", err.to_string())
            }
            SessionError::NotFound { .. } => {
                ApiError::new(StatusCode::NOT_FOUND, "session_not_found", err.to_string())
            }
        }
    }
}

/// Checks who may touch `user_id`'s sessions and spends one write token.
fn admit(state: &AppState, caller: &Caller, user_id: &str) -> Result<(), ApiError> {
    validate_user_id(user_id)?;
    if !caller.may_write(user_id) {
        return Err(forbidden(user_id));
    }
    state
        .limiter
        .check(user_id)
        .map_err(|wait| ApiError::rate_limited(user_id, wait))
}

/// `PUT …/sessions/{sessionID}`: starts or refreshes a session lease and
/// answers the user's effective presence.
pub async fn heartbeat(
    State(state): State<AppState>,
    caller: Caller,
    SessionPath(user_id, session_id): SessionPath,
    JsonBodyOrEmpty(request): JsonBodyOrEmpty<HeartbeatRequest>,
) -> Result<Json<PresenceView>, ApiError> {
    let heartbeat = validate_heartbeat(&user_id, &session_id, request)?;
    admit(&state, &caller, &user_id)?;
    Ok(Json(state.service.heartbeat(heartbeat).await?))
}

/// `DELETE …/sessions/{sessionID}`: ends a session at once.
pub async fn end(
    State(state): State<AppState>,
    caller: Caller,
    SessionPath(user_id, session_id): SessionPath,
) -> Result<Json<PresenceView>, ApiError> {
    validate_session_id(&session_id)?;
    admit(&state, &caller, &user_id)?;
    Ok(Json(
        state.service.end_session(&user_id, &session_id).await?,
    ))
}

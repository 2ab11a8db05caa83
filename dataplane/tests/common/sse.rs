//! A minimal Server-Sent Events client over reqwest, for stream tests.

use serde_json::Value;
use std::collections::VecDeque;
use std::time::Duration;

/// How long a test waits for the next event before failing.
pub const EVENT_TIMEOUT: Duration = Duration::from_secs(30);

/// One parsed event (comments such as keep-alives are skipped).
#[derive(Debug, Clone)]
pub struct SseEvent {
    pub event: String,
    pub id: Option<u64>,
    pub data: Value,
}

/// An open event stream.
pub struct EventStream {
    response: reqwest::Response,
    buffer: String,
    ready: VecDeque<SseEvent>,
}

impl EventStream {
    /// Opens `url` with a reader token and optionally `Last-Event-ID`.
    pub async fn open(client: &reqwest::Client, url: &str, last_event_id: Option<u64>) -> Self {
        EventStream::open_as(client, url, last_event_id, &super::bearer("watcher", "")).await
    }

    /// Opens `url` with the given `Authorization` header value.
    pub async fn open_as(
        client: &reqwest::Client,
        url: &str,
        last_event_id: Option<u64>,
        authorization: &str,
    ) -> Self {
        let mut request = client.get(url).header("Authorization", authorization);
        if let Some(id) = last_event_id {
            request = request.header("Last-Event-ID", id.to_string());
        }
        EventStream::send(request, url).await
    }

    /// Opens `url` as a browser's `EventSource` does: no header, the token
    /// in the URL (`access_token`).
    pub async fn open_without_header(client: &reqwest::Client, url: &str) -> Self {
        EventStream::send(client.get(url), url).await
    }

    async fn send(request: reqwest::RequestBuilder, url: &str) -> Self {
        let response = request.send().await.expect("stream request completes");
        assert_eq!(response.status(), 200, "opening {url}");
        let content_type = response.headers()["content-type"]
            .to_str()
            .unwrap_or_default();
        assert!(
            content_type.starts_with("text/event-stream"),
            "{content_type}"
        );
        EventStream {
            response,
            buffer: String::new(),
            ready: VecDeque::new(),
        }
    }

    /// The next event; fails the test after [`EVENT_TIMEOUT`].
    pub async fn next(&mut self) -> SseEvent {
        tokio::time::timeout(EVENT_TIMEOUT, self.next_inner())
            .await
            .expect("an event arrives in time")
    }

    /// Events up to and including the next `snapshot-end`.
    pub async fn until_snapshot_end(&mut self) -> Vec<SseEvent> {
        let mut events = Vec::new();
        loop {
            let event = self.next().await;
            let done = event.event == "snapshot-end";
            events.push(event);
            if done {
                return events;
            }
        }
    }

    /// Whether the server closes the stream (after any events still
    /// buffered) within [`EVENT_TIMEOUT`].
    pub async fn ended(&mut self) -> bool {
        let drained = async {
            loop {
                match self.response.chunk().await {
                    Ok(Some(_)) => continue,
                    Ok(None) | Err(_) => return,
                }
            }
        };
        tokio::time::timeout(EVENT_TIMEOUT, drained).await.is_ok()
    }

    async fn next_inner(&mut self) -> SseEvent {
        loop {
            if let Some(event) = self.ready.pop_front() {
                return event;
            }
            let chunk = self
                .response
                .chunk()
                .await
                .expect("stream stays readable")
                .expect("stream stays open");
            self.buffer.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                if let Some(event) = parse(&block) {
                    self.ready.push_back(event);
                }
            }
        }
    }
}

fn parse(block: &str) -> Option<SseEvent> {
    let (mut event, mut id, mut data) = (String::from("message"), None, String::new());
    let mut any_field = false;
    for line in block.lines() {
        if line.starts_with(':') || line.is_empty() {
            continue;
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        any_field = true;
        match field {
            "event" => event = value.to_owned(),
            "id" => id = value.parse().ok(),
            "data" => data.push_str(value),
            _ => {}
        }
    }
    any_field.then(|| SseEvent {
        event,
        id,
        data: serde_json::from_str(&data).unwrap_or(Value::String(data)),
    })
}

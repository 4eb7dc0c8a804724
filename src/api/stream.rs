//! `GET /api/v1/alerts/stream[?kind=K,…]`: Server-Sent Events, one `alert` event (the webhook's
//! JSON body) per alert as it is written; a client too slow to keep up is told how many it
//! missed (a `lagged` event) and goes on.

use super::AppState;
use axum::extract::{Query, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use futures::stream::Stream;
use std::collections::HashMap;
use std::convert::Infallible;
use tokio::sync::broadcast::error::RecvError;

pub async fn alerts(
    State(state): State<AppState>,
    Query(params): Query<HashMap<String, String>>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let kinds: Vec<String> = params
        .get("kind")
        .map(|k| k.split(',').map(str::to_owned).filter(|k| !k.is_empty()).collect())
        .unwrap_or_default();
    let receiver = state.live_alerts.subscribe();
    let stream = futures::stream::unfold((receiver, kinds), |(mut receiver, kinds)| async move {
        loop {
            match receiver.recv().await {
                Ok(alert) => {
                    let wanted = kinds.is_empty()
                        || serde_json::from_str::<serde_json::Value>(&alert)
                            .ok()
                            .and_then(|a| a["kind"].as_str().map(|k| kinds.iter().any(|w| w == k)))
                            .unwrap_or(false);
                    if wanted {
                        let event = Event::default().event("alert").data(alert.to_string());
                        return Some((Ok(event), (receiver, kinds)));
                    }
                }
                Err(RecvError::Lagged(missed)) => {
                    let event = Event::default().event("lagged").data(missed.to_string());
                    return Some((Ok(event), (receiver, kinds)));
                }
                Err(RecvError::Closed) => return None,
            }
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

//! `/graphql/ws`: graphql-ws and subscriptions-transport-ws, inside limits.
//! async-graphql speaks the protocol; this loop sits between it and the
//! socket and enforces what the protocol leaves open: an authenticated
//! `connection_init` within a deadline, a cap on subscriptions per socket,
//! and ping/pong liveness. Message size is capped by the upgrade itself.

use std::{
    collections::HashSet,
    net::SocketAddr,
    str::FromStr,
    sync::{Arc, Mutex},
    time::Duration,
};

use async_graphql::{
    Data,
    futures_util::StreamExt,
    http::{WebSocketProtocols, WsMessage},
};
use axum::{
    Extension,
    extract::{
        ConnectInfo, State, WebSocketUpgrade,
        ws::{CloseFrame, Message, WebSocket},
    },
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde_json::{Value, json};

use super::GraphqlState;
use super::init_headers;
use crate::{auth::Principal, error::AppError};

pub async fn ws(
    State(state): State<GraphqlState>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Response {
    let ip = state
        .app
        .limiter
        .as_ref()
        .and_then(|l| l.client_ip(&headers, peer.as_ref().map(|p| &p.0)));
    let Some(protocol) = headers
        .get(header::SEC_WEBSOCKET_PROTOCOL)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.split(',')
                .find_map(|p| WebSocketProtocols::from_str(p.trim()).ok())
        })
    else {
        return (StatusCode::BAD_REQUEST, "unknown websocket subprotocol").into_response();
    };
    let limit = state.app.config.http.body_limit_bytes;
    upgrade
        .protocols(async_graphql::http::ALL_WEBSOCKET_PROTOCOLS)
        .max_message_size(limit)
        .max_frame_size(limit)
        .on_upgrade(move |socket| serve(socket, state, protocol, ip))
}

/// What the loop learns from a client message before passing it on.
enum Seen {
    Subscribe(String, Option<Operation>),
    Stop(String),
    Other,
}

#[derive(serde::Deserialize)]
struct Operation {
    query: String,
    #[serde(rename = "operationName")]
    operation_name: Option<String>,
}

fn inspect(text: &str) -> Seen {
    #[derive(serde::Deserialize)]
    struct Head {
        #[serde(rename = "type")]
        ty: String,
        id: Option<String>,
        payload: Option<Operation>,
    }
    match serde_json::from_str::<Head>(text) {
        Ok(Head {
            ty,
            id: Some(id),
            payload,
        }) if ty == "subscribe" || ty == "start" => Seen::Subscribe(id, payload),
        Ok(Head {
            ty, id: Some(id), ..
        }) if ty == "complete" || ty == "stop" => Seen::Stop(id),
        _ => Seen::Other,
    }
}

/// The server's own messages that end a subscription (its stream finished
/// or failed), so the slot is free again.
fn ended_by_server(text: &str) -> Option<String> {
    let v: Value = serde_json::from_str(text).ok()?;
    let ty = v.get("type")?.as_str()?;
    if ty == "complete" || ty == "error" {
        return v.get("id")?.as_str().map(str::to_string);
    }
    None
}

fn refusal(protocol: WebSocketProtocols, id: &str, e: AppError) -> String {
    let err = json!({ "message": e.message(), "extensions": { "code": e.code() } });
    let payload = match protocol {
        WebSocketProtocols::GraphQLWS => json!([err]),
        WebSocketProtocols::SubscriptionsTransportWS => err,
    };
    json!({ "type": "error", "id": id, "payload": payload }).to_string()
}

async fn close(socket: &mut WebSocket, code: u16, reason: &str) {
    let _ = socket
        .send(Message::Close(Some(CloseFrame {
            code,
            reason: reason.into(),
        })))
        .await;
}

async fn serve(
    mut socket: WebSocket,
    state: GraphqlState,
    protocol: WebSocketProtocols,
    ip: Option<std::net::IpAddr>,
) {
    let cfg = &state.app.config.graphql;
    let max_subscriptions = cfg.ws_max_subscriptions;
    let init_deadline = tokio::time::sleep(Duration::from_secs(cfg.ws_init_timeout_secs.max(1)));
    let mut ping = tokio::time::interval(Duration::from_secs(cfg.ws_ping_interval_secs.max(1)));
    ping.reset();
    tokio::pin!(init_deadline);

    // async-graphql reads client messages from this channel; the loop below
    // decides what reaches it.
    let (to_gql, from_loop) = tokio::sync::mpsc::channel::<Vec<u8>>(16);
    let schema = state.schema.clone();
    let auth_state = state.app.clone();
    // Who the socket authenticated as, for the write limits on mutations
    // sent over it.
    let principal_slot: Arc<Mutex<Option<Principal>>> = Default::default();
    let slot = principal_slot.clone();
    let gql = async_graphql::http::WebSocket::new(schema, tokio_stream_of(from_loop), protocol)
        .on_connection_init(move |payload| async move {
            let headers = init_headers(&payload);
            let principal = auth_state
                .auth
                .principal(&auth_state.core, &headers)
                .await
                .map_err(|e| async_graphql::Error::new(e.message()))?;
            // Subscriptions need a credential; an anonymous socket would only
            // hold resources.
            if principal == Principal::Anonymous {
                return Err(async_graphql::Error::new(
                    AppError::Unauthenticated.message(),
                ));
            }
            *slot.lock().expect("principal slot") = Some(principal.clone());
            let mut data = Data::default();
            data.insert(principal);
            Ok(data)
        });
    tokio::pin!(gql);

    let mut acked = false;
    let mut awaiting_pong = false;
    let mut active: HashSet<String> = HashSet::new();
    loop {
        tokio::select! {
            incoming = socket.recv() => {
                let msg = match incoming {
                    // Errors include a message over the size cap.
                    None | Some(Err(_)) => break,
                    Some(Ok(m)) => m,
                };
                let bytes = match msg {
                    Message::Text(t) => {
                        match inspect(t.as_str()) {
                            Seen::Subscribe(id, op) if acked && !active.contains(&id) => {
                                let refused = if active.len() >= max_subscriptions {
                                    Some(AppError::RateLimited { retry_after_secs: 1 })
                                } else {
                                    mutation_limited(&state, &principal_slot, op.as_ref(), ip).err()
                                };
                                if let Some(e) = refused {
                                    let text = refusal(protocol, &id, e);
                                    if socket.send(Message::Text(text.into())).await.is_err() {
                                        break;
                                    }
                                    continue;
                                }
                                active.insert(id);
                            }
                            Seen::Stop(id) => {
                                active.remove(&id);
                            }
                            _ => {}
                        }
                        t.as_bytes().to_vec()
                    }
                    Message::Binary(b) => b.to_vec(),
                    Message::Pong(_) => {
                        awaiting_pong = false;
                        continue;
                    }
                    // The socket answers pings itself.
                    Message::Ping(_) => continue,
                    Message::Close(_) => break,
                };
                if to_gql.send(bytes).await.is_err() {
                    break;
                }
            }
            out = gql.next() => match out {
                None => break,
                Some(WsMessage::Text(text)) => {
                    if !acked && text.contains("connection_ack") {
                        acked = true;
                    }
                    if let Some(id) = ended_by_server(&text) {
                        active.remove(&id);
                    }
                    if socket.send(Message::Text(text.into())).await.is_err() {
                        break;
                    }
                }
                Some(WsMessage::Close(code, reason)) => {
                    close(&mut socket, code, &reason).await;
                    break;
                }
            },
            _ = &mut init_deadline, if !acked => {
                // graphql-ws's code for "Connection initialisation timeout".
                close(&mut socket, 4408, "connection_init not received in time").await;
                break;
            }
            _ = ping.tick() => {
                if awaiting_pong {
                    // The previous ping went unanswered: the peer is gone.
                    break;
                }
                if socket.send(Message::Ping(Default::default())).await.is_err() {
                    break;
                }
                awaiting_pong = true;
            }
        }
    }
}

/// graphql-ws also carries queries and mutations: a mutation over a socket
/// counts against the same write limits as one over HTTP.
fn mutation_limited(
    state: &GraphqlState,
    principal: &Mutex<Option<Principal>>,
    op: Option<&Operation>,
    ip: Option<std::net::IpAddr>,
) -> Result<(), AppError> {
    let (Some(limiter), Some(op)) = (&state.app.limiter, op) else {
        return Ok(());
    };
    let Some(doc) = state.parse_cache.get(&op.query) else {
        return Ok(());
    };
    if !super::is_mutation(&doc, op.operation_name.as_deref()) {
        return Ok(());
    }
    let principal = principal
        .lock()
        .expect("principal slot")
        .clone()
        .unwrap_or(Principal::Anonymous);
    limiter.check(&principal, ip)
}

/// A receiver as a stream, without pulling in tokio-stream.
fn tokio_stream_of(
    rx: tokio::sync::mpsc::Receiver<Vec<u8>>,
) -> impl async_graphql::futures_util::Stream<Item = Vec<u8>> {
    async_graphql::futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|m| (m, rx))
    })
}

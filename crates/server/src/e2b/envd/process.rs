//! `process.Process`: start processes and stream their output, attach to
//! them, feed their stdin, signal them.

use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, Response};
use bytes::{Bytes, BytesMut};
use serde_json::{json, Value};
use tokio::time::Instant;

use super::proto::{
    self, SelectRequest, SendInputRequest, SendSignalRequest, StartRequest, UpdateRequest,
};
use super::{read_stream_call, read_unary, rpc_scope, within, StreamCall};
use crate::auth::Authenticator;
use crate::backend::{Backend, ProcessEvent, ProcessHandle, ProcessOutput, StartProcess};
use crate::connect::{
    self, encode_end_stream, encode_envelope, unary_response, Code, ConnectError, EnvelopeDecoder,
    StreamSender, FLAG_END_STREAM,
};
use crate::e2b::body::next_chunk;
use crate::e2b::{AppState, E2bState};

/// An end that arrives this close to the deadline, from a killed
/// process, is taken as the deadline's doing.
const DEADLINE_SLACK: Duration = Duration::from_millis(200);

fn deadline_error() -> ConnectError {
    ConnectError::new(Code::DeadlineExceeded, "the command's timeout was reached")
}

/// Output is sent in messages of at most this many bytes (before base64).
const MAX_DATA_CHUNK: usize = 256 << 10;

/// `POST /process.Process/{method}`.
pub async fn rpc<B: Backend, A: Authenticator>(
    State(state): State<AppState<B, A>>,
    Path(method): Path<String>,
    request: Request,
) -> Response<Body> {
    let (parts, body) = request.into_parts();
    match method.as_str() {
        "Start" => start(&state, &parts, body).await,
        "Connect" => connect_to(&state, &parts, body).await,
        "StreamInput" => stream_input(&state, &parts, body).await,
        "List" => list(&state, &parts, body).await,
        "SendInput" => send_input(&state, &parts, body).await,
        "CloseStdin" => close_stdin(&state, &parts, body).await,
        "SendSignal" => send_signal(&state, &parts, body).await,
        "Update" => update(&state, &parts, body).await,
        other => ConnectError::new(
            Code::Unimplemented,
            format!("process.Process/{other} does not exist"),
        )
        .into_unary_response(),
    }
}

async fn start<B: Backend, A: Authenticator>(
    state: &E2bState<B, A>,
    parts: &Parts,
    body: Body,
) -> Response<Body> {
    let call: StreamCall<StartRequest> = match read_stream_call(state, parts, body).await {
        Ok(c) => c,
        Err(response) => return response,
    };
    let Some(process) = call.message.process else {
        return connect::stream_error(ConnectError::invalid("process is required"));
    };
    if process.cmd.is_empty() {
        return connect::stream_error(ConnectError::invalid("process.cmd is required"));
    }
    if let Some(bad) = std::iter::once(&process.cmd)
        .chain(&process.args)
        .chain(process.cwd.iter())
        .find(|s| s.contains('\0'))
    {
        return connect::stream_error(ConnectError::invalid(format!(
            "{bad:?} contains a NUL byte"
        )));
    }
    let req = StartProcess {
        config: process.into(),
        tag: call.message.tag,
        stdin: call.message.stdin.unwrap_or(true),
        pty: call.message.pty.as_ref().map(proto::PtyMsg::size),
        timeout: call.timeout,
    };
    match state.backend.start_process(&call.scope, req).await {
        Ok(handle) => spawn_process_stream(handle, call.timeout, call.keepalive),
        Err(e) => connect::stream_error(e.into()),
    }
}

async fn connect_to<B: Backend, A: Authenticator>(
    state: &E2bState<B, A>,
    parts: &Parts,
    body: Body,
) -> Response<Body> {
    let call: StreamCall<SelectRequest> = match read_stream_call(state, parts, body).await {
        Ok(c) => c,
        Err(response) => return response,
    };
    let selector = match proto::selector(call.message.process) {
        Ok(s) => s,
        Err(e) => return connect::stream_error(e),
    };
    match state.backend.connect_process(&call.scope, &selector).await {
        Ok(handle) => spawn_process_stream(handle, call.timeout, call.keepalive),
        Err(e) => connect::stream_error(e.into()),
    }
}

/// Opens the response stream and feeds it from the process's events in a
/// task of its own.
fn spawn_process_stream(
    handle: ProcessHandle,
    timeout: Option<Duration>,
    keepalive: Option<Duration>,
) -> Response<Body> {
    let (tx, response) = connect::stream_response();
    let deadline = timeout.map(|t| Instant::now() + t);
    tokio::spawn(pump_process(tx, handle, deadline, keepalive));
    response
}

/// Sleeps until `at`, or forever.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Sends a data event, split into messages of at most [`MAX_DATA_CHUNK`].
async fn send_output(
    tx: &StreamSender,
    output: ProcessOutput,
) -> Result<(), connect::StreamClosed> {
    let (bytes, wrap): (Bytes, fn(Bytes) -> ProcessOutput) = match output {
        ProcessOutput::Stdout(b) => (b, ProcessOutput::Stdout),
        ProcessOutput::Stderr(b) => (b, ProcessOutput::Stderr),
        ProcessOutput::Pty(b) => (b, ProcessOutput::Pty),
    };
    let mut rest = bytes;
    while !rest.is_empty() {
        let piece = rest.split_to(rest.len().min(MAX_DATA_CHUNK));
        tx.send(&proto::data_event(&wrap(piece))).await?;
    }
    Ok(())
}

/// The stream of one Start/Connect call: start, output, keepalives, end.
/// Ends with `deadline_exceeded` at the call's deadline (the backend was
/// told the same timeout and kills the process), with `unavailable` if
/// the sandbox goes away first, and silently if the client leaves (the
/// process keeps running, as with envd).
async fn pump_process(
    tx: StreamSender,
    handle: ProcessHandle,
    deadline: Option<Instant>,
    keepalive: Option<Duration>,
) {
    if tx.send(&proto::start_event(handle.pid)).await.is_err() {
        return;
    }
    let mut events = handle.events;
    let mut next_ping = keepalive.map(|k| Instant::now() + k);
    loop {
        tokio::select! {
            biased;
            event = events.recv() => match event {
                Some(ProcessEvent::Data(output)) => {
                    if send_output(&tx, output).await.is_err() {
                        return;
                    }
                    next_ping = keepalive.map(|k| Instant::now() + k);
                }
                Some(ProcessEvent::End(end)) => {
                    // Killed by the deadline (the backend's timer beat
                    // ours): report the deadline, as the SDK expects a
                    // TimeoutException rather than an exit of -1.
                    let at_deadline = deadline.is_some_and(|d| Instant::now() + DEADLINE_SLACK >= d);
                    if at_deadline && !end.exited {
                        tx.finish(Some(deadline_error())).await;
                        return;
                    }
                    if tx.send(&proto::end_event(&end)).await.is_ok() {
                        tx.finish(None).await;
                    }
                    return;
                }
                None => {
                    tx.finish(Some(ConnectError::new(
                        Code::Unavailable,
                        "the sandbox went away before the process ended",
                    )))
                    .await;
                    return;
                }
            },
            () = sleep_until(deadline) => {
                tx.finish(Some(deadline_error())).await;
                return;
            }
            () = sleep_until(next_ping) => {
                if tx.send(&proto::keepalive_event()).await.is_err() {
                    return;
                }
                next_ping = keepalive.map(|k| Instant::now() + k);
            }
            () = tx.closed() => return,
        }
    }
}

/// `StreamInput`: a client stream of start (which process), then data
/// and keepalive messages. Answered with one empty message.
async fn stream_input<B: Backend, A: Authenticator>(
    state: &E2bState<B, A>,
    parts: &Parts,
    mut body: Body,
) -> Response<Body> {
    if let Err(response) = connect::check_request_headers(&parts.headers, true) {
        return response;
    }
    let scope = match rpc_scope(state, &parts.headers).await {
        Ok(s) => s,
        Err(response) => return response,
    };
    let mut decoder = EnvelopeDecoder::new(state.limits.rpc_message);
    let mut selector = None;
    let result: Result<(), ConnectError> = async {
        loop {
            let chunk = next_chunk(&mut body, state.limits.body_idle)
                .await
                .map_err(|e| super::body_error_to_connect(&e))?;
            let Some(chunk) = chunk else { break };
            decoder.push(&chunk);
            while let Some(envelope) = decoder.next_envelope()? {
                if envelope.flags & FLAG_END_STREAM != 0 {
                    return Err(ConnectError::invalid(
                        "a client must not send end-of-stream messages",
                    ));
                }
                let msg: proto::StreamInputRequest = connect::decode_json(&envelope.payload)?;
                if let Some(start) = msg.start {
                    selector = Some(proto::selector(start.process)?);
                } else if let Some(data) = msg.data {
                    let Some(sel) = &selector else {
                        return Err(ConnectError::invalid("the first message must be start"));
                    };
                    let input = proto::input(data.input)?;
                    state.backend.send_input(&scope, sel, input).await?;
                }
            }
        }
        if decoder.is_empty() {
            Ok(())
        } else {
            Err(ConnectError::invalid("the request ended inside a message"))
        }
    }
    .await;
    match result {
        Ok(()) => {
            let mut out = BytesMut::new();
            out.extend_from_slice(&encode_envelope(0, b"{}"));
            out.extend_from_slice(&encode_end_stream(None));
            let mut response = Response::new(Body::from(out.freeze()));
            response.headers_mut().insert(
                axum::http::header::CONTENT_TYPE,
                HeaderValue::from_static(connect::STREAM_CONTENT_TYPE),
            );
            response
        }
        Err(e) => connect::stream_error(e),
    }
}

async fn list<B: Backend, A: Authenticator>(
    state: &E2bState<B, A>,
    parts: &Parts,
    body: Body,
) -> Response<Body> {
    let call = match read_unary::<Value, B, A>(state, parts, body).await {
        Ok(c) => c,
        Err(response) => return response,
    };
    let result = within(call.timeout, state.backend.list_processes(&call.scope)).await;
    unary_response(result.map(|p| proto::list_response(&p)))
}

async fn send_input<B: Backend, A: Authenticator>(
    state: &E2bState<B, A>,
    parts: &Parts,
    body: Body,
) -> Response<Body> {
    let call = match read_unary::<SendInputRequest, B, A>(state, parts, body).await {
        Ok(c) => c,
        Err(response) => return response,
    };
    let result = async {
        let selector = proto::selector(call.message.process)?;
        let input = proto::input(call.message.input)?;
        within(
            call.timeout,
            state.backend.send_input(&call.scope, &selector, input),
        )
        .await
    }
    .await;
    unary_response(result.map(|()| json!({})))
}

async fn close_stdin<B: Backend, A: Authenticator>(
    state: &E2bState<B, A>,
    parts: &Parts,
    body: Body,
) -> Response<Body> {
    let call = match read_unary::<SelectRequest, B, A>(state, parts, body).await {
        Ok(c) => c,
        Err(response) => return response,
    };
    let result = async {
        let selector = proto::selector(call.message.process)?;
        within(
            call.timeout,
            state.backend.close_stdin(&call.scope, &selector),
        )
        .await
    }
    .await;
    unary_response(result.map(|()| json!({})))
}

async fn send_signal<B: Backend, A: Authenticator>(
    state: &E2bState<B, A>,
    parts: &Parts,
    body: Body,
) -> Response<Body> {
    let call = match read_unary::<SendSignalRequest, B, A>(state, parts, body).await {
        Ok(c) => c,
        Err(response) => return response,
    };
    let result = async {
        let signal = call.message.signal()?;
        let selector = proto::selector(call.message.process)?;
        within(
            call.timeout,
            state.backend.send_signal(&call.scope, &selector, signal),
        )
        .await
    }
    .await;
    unary_response(result.map(|()| json!({})))
}

async fn update<B: Backend, A: Authenticator>(
    state: &E2bState<B, A>,
    parts: &Parts,
    body: Body,
) -> Response<Body> {
    let call = match read_unary::<UpdateRequest, B, A>(state, parts, body).await {
        Ok(c) => c,
        Err(response) => return response,
    };
    let result = async {
        let selector = proto::selector(call.message.process)?;
        let size = call.message.pty.as_ref().map(proto::PtyMsg::size);
        within(
            call.timeout,
            state.backend.update_pty(&call.scope, &selector, size),
        )
        .await
    }
    .await;
    unary_response(result.map(|()| json!({})))
}

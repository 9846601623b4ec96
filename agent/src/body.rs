//! Bodies on the HTTP request path: the channel body that carries what the
//! filter chain let through to the upstream or the client, and the limit on
//! what plugins may hold back (Envoy's per-stream buffer limit).

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use hyper::body::{Body, Frame, SizeHint};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

/// Envoy's default per-connection buffer limit (1 MiB), which also bounds
/// what a stream's filters may buffer.
pub const DEFAULT_BUFFER_LIMIT_BYTES: usize = 1024 * 1024;

/// Frames in flight between the task that runs the filter chain and the
/// connection that writes them; small, so a slow peer pushes back.
const CHANNEL_FRAMES: usize = 4;

/// `http:` in the config file: settings of the HTTP request path.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct HttpSettings {
    /// Most body bytes the plugins of one stream may buffer (a plugin that
    /// returns StopIterationAndBuffer): past it a request gets 413 and a
    /// response 500, as in Envoy. Default 1 MiB.
    #[serde(default = "HttpSettings::default_buffer_limit")]
    pub buffer_limit_bytes: usize,
}

impl HttpSettings {
    fn default_buffer_limit() -> usize {
        DEFAULT_BUFFER_LIMIT_BYTES
    }
}

impl Default for HttpSettings {
    fn default() -> Self {
        HttpSettings {
            buffer_limit_bytes: DEFAULT_BUFFER_LIMIT_BYTES,
        }
    }
}

/// Why a body stopped early.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// The filter chain ended the stream (a local reply, a failed plugin, a
    /// buffer overflow) after the headers had gone out: the peer must not
    /// take the truncated body for a whole one.
    #[error("stream aborted: {0}")]
    Aborted(String),
}

/// The sending half of a [`ChannelBody`].
pub struct BodySender(mpsc::Sender<Result<Frame<Bytes>, BodyError>>);

impl BodySender {
    /// Sends a data frame; false if the receiver is gone (the peer left).
    pub async fn data(&self, data: Bytes) -> bool {
        if data.is_empty() {
            return true;
        }
        self.0.send(Ok(Frame::data(data))).await.is_ok()
    }

    pub async fn trailers(&self, trailers: HeaderMap) -> bool {
        self.0.send(Ok(Frame::trailers(trailers))).await.is_ok()
    }

    /// Ends the body with an error, so the peer sees a reset, not an end.
    pub async fn abort(&self, reason: String) {
        let _ = self.0.send(Err(BodyError::Aborted(reason))).await;
    }
}

/// A body whose first part is known and whose rest, if any, another task
/// produces: the request body going upstream and the response body going
/// to the client. `Send`, so hyper-util's pooling client can carry it;
/// dropping every sender ends it.
///
/// What is known up front is at most some data and the trailers (the first
/// piece the filter chain let through), so it is held inline: a response
/// the chain passed whole costs no allocation for its body.
pub struct ChannelBody {
    /// The peer's body itself, when no plugin can see it (an empty chain).
    direct: Option<hyper::body::Incoming>,
    /// Data to send first.
    data: Option<Bytes>,
    /// Trailers to send after `data` (boxed: few bodies have them).
    trailers: Option<Box<HeaderMap>>,
    frames: Option<mpsc::Receiver<Result<Frame<Bytes>, BodyError>>>,
    /// Exact length when the whole body is known up front.
    length: Option<u64>,
}

impl ChannelBody {
    /// A body of `data` and `trailers`, then whatever comes through the
    /// returned sender (if `more`).
    pub fn new(
        data: Bytes,
        trailers: Option<HeaderMap>,
        more: bool,
    ) -> (Option<BodySender>, ChannelBody) {
        // A known length lets hyper frame with content-length, which
        // cannot carry trailers: those need chunked (HTTP/1.1).
        let length = (!more && trailers.is_none()).then_some(data.len() as u64);
        let (sender, frames) = if more {
            let (tx, rx) = mpsc::channel(CHANNEL_FRAMES);
            (Some(BodySender(tx)), Some(rx))
        } else {
            (None, None)
        };
        let body = ChannelBody {
            direct: None,
            data: (!data.is_empty()).then_some(data),
            trailers: trailers.map(Box::new),
            frames,
            length,
        };
        (sender, body)
    }

    /// A body known in full.
    pub fn full(data: Bytes) -> ChannelBody {
        ChannelBody::new(data, None, false).1
    }

    /// The peer's body as it comes, for a chain without plugins.
    pub fn direct(body: hyper::body::Incoming) -> ChannelBody {
        ChannelBody {
            direct: Some(body),
            data: None,
            trailers: None,
            frames: None,
            length: None,
        }
    }

    /// An empty body (end of stream right away).
    pub fn empty() -> ChannelBody {
        ChannelBody::full(Bytes::new())
    }
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        if let Some(direct) = self.direct.as_mut() {
            return Pin::new(direct)
                .poll_frame(cx)
                .map_err(|e| BodyError::Aborted(e.to_string()));
        }
        if let Some(data) = self.data.take() {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        if let Some(trailers) = self.trailers.take() {
            return Poll::Ready(Some(Ok(Frame::trailers(*trailers))));
        }
        let Some(frames) = self.frames.as_mut() else {
            return Poll::Ready(None);
        };
        match frames.poll_recv(cx) {
            Poll::Ready(None) => {
                self.frames = None;
                Poll::Ready(None)
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        if let Some(direct) = &self.direct {
            return direct.is_end_stream();
        }
        self.data.is_none() && self.trailers.is_none() && self.frames.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        if let Some(direct) = &self.direct {
            return direct.size_hint();
        }
        match self.length {
            Some(length) => SizeHint::with_exact(length),
            None => SizeHint::default(),
        }
    }
}

/// A body known in full: data, then optional trailers (callouts).
pub struct WholeBody {
    data: Option<Bytes>,
    trailers: Option<HeaderMap>,
    length: u64,
}

impl WholeBody {
    pub fn new(data: Bytes, trailers: Option<HeaderMap>) -> WholeBody {
        let length = data.len() as u64;
        WholeBody {
            data: (!data.is_empty()).then_some(data),
            trailers,
            length,
        }
    }
}

impl Body for WholeBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if let Some(data) = self.data.take() {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none() && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.length)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    fn block_on<F: std::future::Future>(future: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(future)
    }

    #[test]
    fn a_whole_body_has_its_exact_length_and_ends_after_its_data() {
        let body = ChannelBody::full(Bytes::from_static(b"hello"));
        assert_eq!(body.size_hint().exact(), Some(5));
        assert!(!body.is_end_stream());
        let collected = block_on(body.collect()).unwrap();
        assert_eq!(&collected.to_bytes()[..], b"hello");
        let empty = ChannelBody::empty();
        assert!(empty.is_end_stream());
        assert_eq!(empty.size_hint().exact(), Some(0));
    }

    #[test]
    fn trailers_follow_the_data_and_leave_the_length_open() {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().unwrap());
        let (sender, body) = ChannelBody::new(Bytes::from_static(b"ab"), Some(trailers), false);
        assert!(sender.is_none());
        assert_eq!(body.size_hint().exact(), None);
        let collected = block_on(body.collect()).unwrap();
        assert_eq!(collected.trailers().unwrap()["grpc-status"], "0");
        assert_eq!(&collected.to_bytes()[..], b"ab");
    }

    #[test]
    fn what_the_sender_sends_comes_after_the_known_data() {
        block_on(async {
            let (sender, body) = ChannelBody::new(Bytes::from_static(b"first "), None, true);
            let sender = sender.expect("more follows: a sender");
            let send = async move {
                assert!(sender.data(Bytes::from_static(b"then more")).await);
            };
            let (collected, ()) = tokio::join!(body.collect(), send);
            assert_eq!(&collected.unwrap().to_bytes()[..], b"first then more");
        });
    }
}

//! gRPC over h2c with the `h2` crate: one unary call, `/shop.Checkout/Pay`, as the rig's gRPC
//! app (`e2e/apps/grpc`, @grpc/grpc-js) serves it, and a blocking caller for the load.

use std::io;
use std::time::Duration;

use bytes::Bytes;
use h2::client::SendRequest;

/// The rig's one method.
pub const PAY: &str = "/shop.Checkout/Pay";

/// How a call ended: the HTTP status and the `grpc-status` (trailers, or the headers of a
/// trailers-only answer such as Envoy's own).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ended {
    pub http: u16,
    pub grpc: Option<u32>,
}

impl Ended {
    pub fn ok(&self) -> bool {
        self.http == 200 && self.grpc == Some(0)
    }

    /// The HTTP status a gateway maps this end to (Envoy's `Grpc::Utility::grpcToHttpStatus`):
    /// OK 200, UNAVAILABLE 503, DEADLINE_EXCEEDED 504, UNIMPLEMENTED 501, anything else 500. The
    /// rollout's table counts gRPC calls in these.
    pub fn as_http(&self) -> u16 {
        match (self.http, self.grpc) {
            (200, Some(0)) => 200,
            (200, Some(14)) => 503,
            (200, Some(4)) => 504,
            (200, Some(12)) => 501,
            (200, _) => 500,
            (status, _) => status,
        }
    }
}

/// An h2c connection to `port`, its driver left to run on the current runtime.
pub async fn connect(port: u16) -> io::Result<SendRequest<Bytes>> {
    Ok(crate::h2c::open(port).await?.0)
}

/// One unary call to [`PAY`] with a 2-byte message.
pub async fn pay(send: SendRequest<Bytes>) -> Result<Ended, h2::Error> {
    let mut send = send.ready().await?;
    let request = http::Request::post(format!("http://checkout{PAY}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .map_err(|_| h2::Error::from(h2::Reason::INTERNAL_ERROR))?;
    let (response, mut body) = send.send_request(request, false)?;
    body.send_data(Bytes::from_static(&[0, 0, 0, 0, 2, b'h', b'i']), true)?;
    let response = response.await?;
    let http = response.status().as_u16();
    let status = |headers: &http::HeaderMap| headers.get("grpc-status").and_then(|v| v.to_str().ok()?.parse().ok());
    let in_headers = status(response.headers());
    let mut body = response.into_body();
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    let trailers = body.trailers().await?;
    Ok(Ended { http, grpc: in_headers.or_else(|| trailers.as_ref().and_then(status)) })
}

/// A blocking gRPC client on one h2c connection, reopened after it fails.
pub struct Caller {
    rt: tokio::runtime::Runtime,
    send: Option<SendRequest<Bytes>>,
    timeout: Duration,
}

impl Caller {
    pub fn new(timeout: Duration) -> io::Result<Caller> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        Ok(Caller { rt, send: None, timeout })
    }

    /// One call on this client's connection (opened first if need be). A connection the server
    /// told to go (GOAWAY) before this call was sent is replaced first: nothing was sent on it.
    pub fn call(&mut self, port: u16) -> io::Result<Ended> {
        let (send, timeout) = (self.send.take(), self.timeout);
        let (ended, send) = self.rt.block_on(async move {
            let fresh = async { connect(port).await };
            let send = match send {
                Some(s) => match s.ready().await {
                    Ok(s) => s,
                    Err(_) => fresh.await?,
                },
                None => fresh.await?,
            };
            let kept = send.clone();
            match tokio::time::timeout(timeout, pay(send)).await {
                Ok(Ok(ended)) => Ok((ended, Some(kept))),
                Ok(Err(e)) => Err(io::Error::other(e)),
                Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "gRPC call timed out")),
            }
        })?;
        self.send = send;
        Ok(ended)
    }
}

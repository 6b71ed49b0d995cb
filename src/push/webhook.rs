//! One webhook delivery: a JSON body POSTed over HTTP/1.1 with its signature,
//! `X-Noomnim-Signature: sha256=<hex HMAC-SHA256 of the body under PUSH_WEBHOOK_SECRET>`, and
//! the job's id as `X-Noomnim-Delivery` and `Idempotency-Key` (the same on every retry). Any
//! 2xx is delivered; anything else (a refusal, a timeout, another status) is a failure to
//! retry. Blocking, on the push worker's thread only, with short timeouts.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use crate::auth::Secret;
use crate::config::WebhookUrl;
use crate::model::PushJob;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Most response bytes read (the status line is all that matters).
const MAX_RESPONSE_BYTES: usize = 16 * 1024;

/// The body of a job's POST.
pub fn body_of(job: &PushJob) -> Vec<u8> {
    let mut body = serde_json::json!({
        "id": job.id,
        "username": job.username,
        "group_name": job.group_name,
        "kind": job.kind,
        "seq": job.seq,
        "sender": job.sender,
        "queued_at_ms": job.created_ms,
    });
    if let Some(preview) = &job.preview {
        body["preview"] = serde_json::json!(preview);
    }
    body.to_string().into_bytes()
}

/// `sha256=` and the hex HMAC-SHA256 of `body`.
pub fn signature(secret: &Secret, body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.expose());
    let tag = ring::hmac::sign(&key, body);
    let hex: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256={hex}")
}

/// POSTs the job; `Err` says why it did not count as delivered.
pub fn post(url: &WebhookUrl, secret: &Secret, job: &PushJob) -> Result<(), String> {
    let body = body_of(job);
    let addr = (url.host.as_str(), url.port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {}: {e}", url.host))?
        .next()
        .ok_or_else(|| format!("{} has no address", url.host))?;
    let mut stream =
        TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(IO_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(IO_TIMEOUT)))
        .map_err(|e| e.to_string())?;
    let host = if url.port == 80 {
        url.host.clone()
    } else {
        format!("{}:{}", url.host, url.port)
    };
    let head = format!(
        "POST {} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: noomnim/{}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nX-Noomnim-Signature: {}\r\nX-Noomnim-Delivery: {}\r\nIdempotency-Key: {}\r\nConnection: close\r\n\r\n",
        url.path,
        env!("CARGO_PKG_VERSION"),
        body.len(),
        signature(secret, &body),
        job.id,
        job.id,
    );
    stream
        .write_all(head.as_bytes())
        .and_then(|()| stream.write_all(&body))
        .map_err(|e| e.to_string())?;
    let mut response = Vec::new();
    let mut chunk = [0u8; 4096];
    while !response.windows(2).any(|w| w == b"\r\n") && response.len() < MAX_RESPONSE_BYTES {
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => response.extend_from_slice(&chunk[..n]),
            Err(e) => return Err(e.to_string()),
        }
    }
    let status_line = String::from_utf8_lossy(&response);
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse::<u16>().ok())
        .ok_or_else(|| "no HTTP status in the response".to_string())?;
    if (200..300).contains(&status) {
        Ok(())
    } else {
        Err(format!("the webhook answered {status}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signs_the_body_with_hmac_sha256() {
        // The value computed independently, as a receiver would:
        // python3 -c "import hmac,hashlib;print(hmac.new(b'k'*32,b'{}',hashlib.sha256).hexdigest())"
        let secret = Secret::new(vec![b'k'; 32]);
        assert_eq!(
            signature(&secret, b"{}"),
            "sha256=3ee8b232b00d38a65125697b8ca96902d432dd558eb14939ffda0723647e7f81"
        );
    }
}

//! A Unix-socket forwarder that lowers the Docker API version in request paths.
//!
//! testcontainers 0.28 talks to the engine through bollard 0.21, which puts
//! its own API version (1.5x) into every request path and never negotiates.
//! Engines older than that version reject every request ("client version 1.53
//! is too new"); Debian 12's docker.io 20.10 stops at 1.41. When the engine is
//! older, [`start`] runs this forwarder and testcontainers connects to it
//! instead of the engine. It rewrites `/v1.53/...` to `/v1.41/...` in each
//! request line and copies everything else unchanged, including request
//! bodies, chunked uploads and upgraded (hijacked) exec streams.
//!
//! The socket lives in a directory only the current user can enter, because
//! any process that reaches the Docker socket controls the machine.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::engine::ApiVersion;

/// Maximum size of a request head (request line plus headers) the forwarder accepts.
const MAX_HEAD_BYTES: usize = 64 * 1024;

/// A running forwarder; it lives until the process exits.
pub(crate) struct ApiShim {
    /// Socket that clients connect to instead of the engine's.
    pub(crate) socket: PathBuf,
}

/// Start a forwarder from a fresh private socket to `upstream`, rewriting
/// request paths to `version`.
///
/// The forwarder runs on its own thread and runtime, so it outlives the
/// runtime of the test or command that started it.
pub(crate) fn start(upstream: PathBuf, version: ApiVersion) -> io::Result<ApiShim> {
    remove_stale_dirs();
    let dir = std::env::temp_dir().join(format!("ringleader-docker-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir(&dir)?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
    let socket = dir.join("docker.sock");

    let std_listener = std::os::unix::net::UnixListener::bind(&socket)?;
    std_listener.set_nonblocking(true)?;
    std::thread::Builder::new()
        .name("docker-api-shim".into())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a current-thread runtime builds without special resources");
            runtime.block_on(accept_loop(std_listener, upstream, version));
        })?;
    Ok(ApiShim { socket })
}

async fn accept_loop(listener: std::os::unix::net::UnixListener, upstream: PathBuf, version: ApiVersion) {
    let listener = match UnixListener::from_std(listener) {
        Ok(listener) => listener,
        Err(error) => {
            tracing::error!(%error, "docker API shim: cannot register its listener");
            return;
        }
    };
    loop {
        match listener.accept().await {
            Ok((client, _)) => {
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    if let Err(error) = forward_connection(client, &upstream, version).await {
                        tracing::debug!(%error, "docker API shim: connection ended with an error");
                    }
                });
            }
            Err(error) => tracing::warn!(%error, "docker API shim: accept failed"),
        }
    }
}

async fn forward_connection(client: UnixStream, upstream: &Path, version: ApiVersion) -> io::Result<()> {
    let upstream = UnixStream::connect(upstream).await?;
    let (client_read, mut client_write) = client.into_split();
    let (mut upstream_read, mut upstream_write) = upstream.into_split();

    let responses = tokio::spawn(async move {
        let copied = tokio::io::copy(&mut upstream_read, &mut client_write).await;
        let _ = client_write.shutdown().await;
        copied
    });

    let mut requests = BufReader::new(client_read);
    let forwarded = forward_requests(&mut requests, &mut upstream_write, version).await;
    let _ = upstream_write.shutdown().await;
    let _ = responses.await;
    forwarded
}

/// The framing of one request body, as its headers announce it.
#[derive(Debug, PartialEq, Eq)]
enum Framing {
    Empty,
    Length(u64),
    Chunked,
    /// The connection switches protocols after this request; from here on
    /// both directions are raw byte streams.
    Upgrade,
}

async fn forward_requests<R, W>(requests: &mut R, upstream: &mut W, version: ApiVersion) -> io::Result<()>
where
    R: AsyncBufRead + Unpin,
    W: AsyncWrite + Unpin,
{
    loop {
        let Some(head) = read_head(requests).await? else {
            return Ok(());
        };
        let (head, framing) = rewrite_head(&head, version)?;
        upstream.write_all(&head).await?;

        match framing {
            Framing::Empty => {}
            Framing::Length(length) => {
                let copied = tokio::io::copy(&mut (&mut *requests).take(length), upstream).await?;
                if copied != length {
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "request body ended early"));
                }
            }
            Framing::Chunked => copy_chunked(requests, upstream).await?,
            Framing::Upgrade => {
                tokio::io::copy(requests, upstream).await?;
                return Ok(());
            }
        }
        upstream.flush().await?;
    }
}

/// Read one request head up to and including the blank line; `None` at a
/// clean end of stream between requests.
async fn read_head<R: AsyncBufRead + Unpin>(reader: &mut R) -> io::Result<Option<Vec<u8>>> {
    let mut head = Vec::new();
    loop {
        let start = head.len();
        let read = reader.read_until(b'\n', &mut head).await?;
        if read == 0 {
            if head.is_empty() {
                return Ok(None);
            }
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "request head ended early"));
        }
        if head.len() > MAX_HEAD_BYTES {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "request head too long"));
        }
        let line = &head[start..];
        if line == b"\r\n" || line == b"\n" {
            return Ok(Some(head));
        }
    }
}

/// Rewrite the version prefix of the request target and find the body framing.
fn rewrite_head(head: &[u8], version: ApiVersion) -> io::Result<(Vec<u8>, Framing)> {
    let text = std::str::from_utf8(head)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "request head is not UTF-8"))?;
    let (request_line, headers) = text
        .split_once("\r\n")
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "request line without CRLF"))?;

    let mut parts = request_line.splitn(3, ' ');
    let (Some(method), Some(target), Some(protocol)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "malformed request line"));
    };
    let target = rewrite_target(target, version);

    let mut framing = Framing::Empty;
    for line in headers.split("\r\n") {
        let Some((name, value)) = line.split_once(':') else { continue };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            let length = value
                .parse()
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "invalid Content-Length"))?;
            if framing == Framing::Empty {
                framing = Framing::Length(length);
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding") && value.to_ascii_lowercase().contains("chunked") {
            framing = Framing::Chunked;
        } else if name.eq_ignore_ascii_case("upgrade") {
            framing = Framing::Upgrade;
        }
    }

    let rewritten = format!("{method} {target} {protocol}\r\n{headers}");
    Ok((rewritten.into_bytes(), framing))
}

/// Replace a leading `/v<major>.<minor>` with `version`; other targets pass unchanged.
fn rewrite_target(target: &str, version: ApiVersion) -> String {
    let Some(rest) = target.strip_prefix("/v") else {
        return target.to_string();
    };
    let end = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
    let number = &rest[..end];
    let is_version = number.split_once('.').is_some_and(|(major, minor)| {
        !major.is_empty() && !minor.is_empty() && !minor.contains('.')
    });
    if !is_version {
        return target.to_string();
    }
    format!("/v{}.{}{}", version.major, version.minor, &rest[end..])
}

async fn copy_chunked<R, W>(reader: &mut R, writer: &mut W) -> io::Result<()>
where
    R: AsyncBufRead + Unpin,
    W: AsyncWrite + Unpin,
{
    loop {
        let mut size_line = Vec::new();
        if reader.read_until(b'\n', &mut size_line).await? == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "chunked body ended early"));
        }
        writer.write_all(&size_line).await?;

        let size_text = String::from_utf8_lossy(&size_line);
        let size_hex = size_text.trim().split(';').next().unwrap_or("");
        let size = u64::from_str_radix(size_hex, 16)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "invalid chunk size"))?;

        if size == 0 {
            // Trailer fields, then the blank line that ends the body.
            loop {
                let mut line = Vec::new();
                if reader.read_until(b'\n', &mut line).await? == 0 {
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "chunk trailer ended early"));
                }
                writer.write_all(&line).await?;
                if line == b"\r\n" || line == b"\n" {
                    return Ok(());
                }
            }
        }

        // The chunk data and its closing CRLF.
        let expected = size + 2;
        let copied = tokio::io::copy(&mut (&mut *reader).take(expected), writer).await?;
        if copied != expected {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "chunk ended early"));
        }
    }
}

/// Remove socket directories of earlier processes that have exited.
fn remove_stale_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|name| name.strip_prefix("ringleader-docker-")) else {
            continue;
        };
        let Ok(pid) = pid.parse::<i32>() else { continue };
        let alive = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok();
        if !alive {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OLD: ApiVersion = ApiVersion { major: 1, minor: 41 };

    #[test]
    fn target_version_is_lowered() {
        assert_eq!(rewrite_target("/v1.53/containers/json?all=1", OLD), "/v1.41/containers/json?all=1");
        assert_eq!(rewrite_target("/v1.53", OLD), "/v1.41");
    }

    #[test]
    fn unversioned_targets_pass_unchanged() {
        assert_eq!(rewrite_target("/_ping", OLD), "/_ping");
        assert_eq!(rewrite_target("/volumes/v1.2", OLD), "/volumes/v1.2");
        assert_eq!(rewrite_target("/version", OLD), "/version");
    }

    #[tokio::test]
    async fn pipelined_requests_keep_their_bodies() {
        let input = b"POST /v1.53/networks/create HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello\
GET /v1.53/_ping HTTP/1.1\r\nHost: d\r\n\r\n\
POST /v1.53/images/load HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n";
        let mut reader = BufReader::new(&input[..]);
        let mut output = Vec::new();
        forward_requests(&mut reader, &mut output, OLD).await.unwrap();

        let expected = b"POST /v1.41/networks/create HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello\
GET /v1.41/_ping HTTP/1.1\r\nHost: d\r\n\r\n\
POST /v1.41/images/load HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n";
        assert_eq!(String::from_utf8_lossy(&output), String::from_utf8_lossy(expected));
    }

    #[tokio::test]
    async fn upgraded_connection_is_copied_raw() {
        let input = b"POST /v1.53/exec/abc/start HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: tcp\r\nContent-Length: 2\r\n\r\n{}GET /v1.53/not-a-request";
        let mut reader = BufReader::new(&input[..]);
        let mut output = Vec::new();
        forward_requests(&mut reader, &mut output, OLD).await.unwrap();

        let text = String::from_utf8(output).unwrap();
        assert!(text.starts_with("POST /v1.41/exec/abc/start HTTP/1.1\r\n"), "{text}");
        assert!(text.ends_with("{}GET /v1.53/not-a-request"), "{text}");
    }
}

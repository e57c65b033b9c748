//! Connection to the local Docker engine.
//!
//! The engine's API version decides how we talk to it. bollard connects with
//! the version it reads from the engine's `/_ping`. testcontainers has no
//! setting for the version, so it goes through [`crate::api_shim`] when the
//! engine is older than the version its bollard requests.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use testcontainers::bollard::{self, ClientVersion, Docker};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use crate::api_shim;
use crate::error::{Error, Result};

/// Seconds bollard waits for one API response.
const REQUEST_TIMEOUT_SECS: u64 = 120;

/// A Docker remote API version such as 1.41.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ApiVersion {
    pub major: u32,
    pub minor: u32,
}

impl std::fmt::Display for ApiVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// A bollard client bound to the engine's socket at a version it accepts.
#[derive(Clone)]
pub struct Engine {
    pub(crate) docker: Docker,
    /// Version used for requests: the lower of the engine's and bollard's.
    pub version: ApiVersion,
}

/// Returns the engine socket, read from `DOCKER_HOST` before any shim replaced it.
fn engine_socket() -> &'static PathBuf {
    static SOCKET: OnceLock<PathBuf> = OnceLock::new();
    SOCKET.get_or_init(|| match std::env::var("DOCKER_HOST") {
        Ok(host) if host.starts_with("unix://") => PathBuf::from(host.trim_start_matches("unix://")),
        _ => PathBuf::from("/var/run/docker.sock"),
    })
}

impl Engine {
    /// Connect to the engine and make sure testcontainers can reach it too.
    ///
    /// Call this before the first testcontainers request of the process: it
    /// may point `DOCKER_HOST` at the version shim.
    pub async fn connect() -> Result<Engine> {
        let socket = engine_socket();
        let server = ping_api_version(socket).await?;
        let bollard_version = ApiVersion {
            major: bollard::API_DEFAULT_VERSION.major_version as u32,
            minor: bollard::API_DEFAULT_VERSION.minor_version as u32,
        };
        let version = server.min(bollard_version);
        if server < bollard_version {
            route_testcontainers_through_shim(socket, server)?;
        }

        let client_version = ClientVersion {
            major_version: version.major as usize,
            minor_version: version.minor as usize,
        };
        let docker = Docker::connect_with_unix(&socket.to_string_lossy(), REQUEST_TIMEOUT_SECS, &client_version)
            .map_err(Error::docker(format!("connect to {}", socket.display())))?;
        Ok(Engine { docker, version })
    }
}

/// Start the version shim once per process and point testcontainers at it.
fn route_testcontainers_through_shim(socket: &Path, server: ApiVersion) -> Result<()> {
    static SHIM: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    let shim = SHIM.get_or_init(|| {
        let shim = api_shim::start(socket.to_path_buf(), server).map_err(|error| error.to_string())?;
        tracing::info!(
            engine_api = %server,
            shim = %shim.socket.display(),
            "engine is older than testcontainers' bollard; routing testcontainers through the version shim"
        );
        // SAFETY-RELEVANT NOTE: `set_var` races with C code reading the
        // environment on other threads. It runs once, before testcontainers
        // reads DOCKER_HOST, while this crate's own threads only use
        // std::env, which takes the same lock.
        std::env::set_var("DOCKER_HOST", format!("unix://{}", shim.socket.display()));
        Ok(shim.socket)
    });
    match shim {
        Ok(_) => Ok(()),
        Err(detail) => Err(Error::EngineReply {
            socket: socket.to_path_buf(),
            detail: format!("cannot start the API version shim: {detail}"),
        }),
    }
}

/// Read the engine's maximum API version from the `Api-Version` header of
/// `GET /_ping`, which every engine serves without a version prefix.
async fn ping_api_version(socket: &Path) -> Result<ApiVersion> {
    let unreachable = |source| Error::EngineUnreachable { socket: socket.to_path_buf(), source };
    let mut stream = UnixStream::connect(socket).await.map_err(unreachable)?;
    stream
        .write_all(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
        .await
        .map_err(unreachable)?;
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply).await.map_err(unreachable)?;

    let reply = String::from_utf8_lossy(&reply);
    parse_api_version_header(&reply).ok_or_else(|| Error::EngineReply {
        socket: socket.to_path_buf(),
        detail: format!("no Api-Version header in the /_ping reply: {:?}", reply.lines().next().unwrap_or("")),
    })
}

fn parse_api_version_header(reply: &str) -> Option<ApiVersion> {
    let head = reply.split("\r\n\r\n").next()?;
    let value = head.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.trim().eq_ignore_ascii_case("api-version").then(|| value.trim())
    })?;
    let (major, minor) = value.split_once('.')?;
    Some(ApiVersion { major: major.parse().ok()?, minor: minor.parse().ok()? })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_version_header_is_parsed() {
        let reply = "HTTP/1.1 200 OK\r\nApi-Version: 1.41\r\nOstype: linux\r\n\r\nOK";
        assert_eq!(parse_api_version_header(reply), Some(ApiVersion { major: 1, minor: 41 }));
    }

    #[test]
    fn missing_api_version_header_is_none() {
        assert_eq!(parse_api_version_header("HTTP/1.1 404 Not Found\r\n\r\n"), None);
    }

    #[test]
    fn versions_order_by_minor_within_major() {
        assert!(ApiVersion { major: 1, minor: 41 } < ApiVersion { major: 1, minor: 53 });
    }
}

//! The framing between the launcher's [`SimSpawner`](crate::spawner::SimSpawner)
//! and a host's [`agent`](crate::agent): one simulated TCP connection per
//! rank session, carrying tagged, length-prefixed frames both ways.

use std::io;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The port the simulated sshd listens on.
pub const AGENT_PORT: u16 = 22;

/// Largest payload a frame may carry; bigger frames mean a corrupt stream.
const MAX_PAYLOAD: usize = 1 << 20;

/// The launcher's request to start a rank.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StartRequest {
    pub rank: usize,
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    /// `(variable, contents)` of the files the rank gets, like `MLX_HOSTFILE`.
    pub files: Vec<(String, String)>,
    pub stdin: bool,
}

/// One message on a rank session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// Launcher to agent: start the rank (JSON of [`StartRequest`]).
    Start(Vec<u8>),
    /// Launcher to agent: bytes for the rank's stdin.
    Stdin(Vec<u8>),
    /// Launcher to agent: the rank's stdin reached end of file.
    StdinEof,
    /// Launcher to agent: deliver this signal number to the rank's process group.
    Signal(i32),
    /// Either way: the peer is alive.
    Heartbeat,
    /// Agent to launcher: the rank runs with this pid.
    Started(u32),
    /// Agent to launcher: the rank could not start, with the reason.
    StartFailed(String),
    /// Agent to launcher: output of the rank's stdout (1) or stderr (2).
    Output(u8, Vec<u8>),
    /// Agent to launcher: the rank's stdout (1) or stderr (2) reached end of file.
    OutputEof(u8),
    /// Agent to launcher: the rank's group leader ended: `(exit code, signal)`,
    /// exactly one of which is non-negative.
    Exited(i32, i32),
}

impl Frame {
    fn tag_and_payload(&self) -> (u8, Vec<u8>) {
        match self {
            Frame::Start(json) => (b'S', json.clone()),
            Frame::Stdin(bytes) => (b'I', bytes.clone()),
            Frame::StdinEof => (b'i', Vec::new()),
            Frame::Signal(signal) => (b'K', signal.to_be_bytes().to_vec()),
            Frame::Heartbeat => (b'H', Vec::new()),
            Frame::Started(pid) => (b'P', pid.to_be_bytes().to_vec()),
            Frame::StartFailed(reason) => (b'F', reason.as_bytes().to_vec()),
            Frame::Output(stream, bytes) => {
                let mut payload = Vec::with_capacity(bytes.len() + 1);
                payload.push(*stream);
                payload.extend_from_slice(bytes);
                (b'O', payload)
            }
            Frame::OutputEof(stream) => (b'o', vec![*stream]),
            Frame::Exited(code, signal) => {
                let mut payload = code.to_be_bytes().to_vec();
                payload.extend_from_slice(&signal.to_be_bytes());
                (b'X', payload)
            }
        }
    }

    fn parse(tag: u8, payload: Vec<u8>) -> io::Result<Frame> {
        let invalid = || {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("invalid frame with tag {tag:#04x}"),
            )
        };
        let int = |bytes: &[u8]| -> io::Result<i32> {
            Ok(i32::from_be_bytes(bytes.try_into().map_err(|_| invalid())?))
        };
        Ok(match tag {
            b'S' => Frame::Start(payload),
            b'I' => Frame::Stdin(payload),
            b'i' => Frame::StdinEof,
            b'K' => Frame::Signal(int(&payload)?),
            b'H' => Frame::Heartbeat,
            b'P' => Frame::Started(int(&payload)? as u32),
            b'F' => Frame::StartFailed(String::from_utf8_lossy(&payload).into_owned()),
            b'O' if !payload.is_empty() => Frame::Output(payload[0], payload[1..].to_vec()),
            b'o' if payload.len() == 1 => Frame::OutputEof(payload[0]),
            b'X' if payload.len() == 8 => Frame::Exited(int(&payload[..4])?, int(&payload[4..])?),
            _ => return Err(invalid()),
        })
    }
}

/// Writes one frame and flushes it.
pub async fn write_frame<W: AsyncWrite + Unpin>(writer: &mut W, frame: &Frame) -> io::Result<()> {
    let (tag, payload) = frame.tag_and_payload();
    let mut bytes = Vec::with_capacity(payload.len() + 5);
    bytes.push(tag);
    bytes.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    bytes.extend_from_slice(&payload);
    writer.write_all(&bytes).await?;
    writer.flush().await
}

/// Reads one frame; `Ok(None)` at a clean end of stream between frames.
/// Not cancel-safe: keep the reader in its own task.
pub async fn read_frame<R: AsyncRead + Unpin>(reader: &mut R) -> io::Result<Option<Frame>> {
    let mut header = [0u8; 5];
    match reader.read_exact(&mut header[..1]).await {
        Ok(_) => {}
        Err(error) if error.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(error) => return Err(error),
    }
    reader.read_exact(&mut header[1..]).await?;
    let len = u32::from_be_bytes(header[1..].try_into().expect("four bytes")) as usize;
    if len > MAX_PAYLOAD {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {len} bytes is too large"),
        ));
    }
    let mut payload = vec![0u8; len];
    reader.read_exact(&mut payload).await?;
    Frame::parse(header[0], payload).map(Some)
}

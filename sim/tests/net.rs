//! `SimNet` behaves like `TokioNet`: the same bytes, the same error kinds.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use ringleader::net::{Listener, Net};
use ringleader_sim::net::SimNet;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PORT: u16 = 7000;

fn sim() -> turmoil::Sim<'static> {
    turmoil::Builder::new()
        .rng_seed(1)
        .simulation_duration(Duration::from_secs(60))
        .build()
}

fn any(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port)
}

fn server_addr() -> SocketAddr {
    SocketAddr::new(turmoil::lookup("server"), PORT)
}

#[test]
fn sim_net_carries_bytes_both_ways() {
    let mut sim = sim();
    sim.host("server", || async {
        let mut listener = SimNet::default().bind(any(PORT)).await?;
        assert_eq!(listener.local_addr()?.port(), PORT);
        let (mut stream, _peer) = listener.accept().await?;
        let mut buf = [0u8; 4];
        stream.read_exact(&mut buf).await?;
        assert_eq!(&buf, b"ping");
        stream.write_all(b"pong").await?;
        std::future::pending::<()>().await;
        Ok(())
    });
    sim.client("client", async {
        let mut stream = SimNet::default().connect(server_addr()).await?;
        stream.write_all(b"ping").await?;
        let mut buf = [0u8; 4];
        stream.read_exact(&mut buf).await?;
        assert_eq!(&buf, b"pong");
        Ok(())
    });

    sim.run().unwrap();
}

#[test]
fn sim_net_bind_of_busy_port_is_addr_in_use() {
    let mut sim = sim();
    sim.client("client", async {
        let net = SimNet::default();
        let _listener = net.bind(any(PORT)).await?;

        let error = net
            .bind(any(PORT))
            .await
            .err()
            .expect("the second bind fails");

        assert_eq!(error.kind(), io::ErrorKind::AddrInUse);
        Ok(())
    });

    sim.run().unwrap();
}

#[test]
fn sim_net_bind_of_foreign_ip_is_addr_not_available() {
    let mut sim = sim();
    sim.client("client", async {
        let foreign = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 9, 9, 9)), PORT);

        let error = SimNet::default()
            .bind(foreign)
            .await
            .err()
            .expect("binding a foreign IP fails");

        assert_eq!(error.kind(), io::ErrorKind::AddrNotAvailable);
        Ok(())
    });

    sim.run().unwrap();
}

#[test]
fn sim_net_connect_without_listener_is_refused() {
    let mut sim = sim();
    sim.host("server", || async {
        std::future::pending::<()>().await;
        Ok(())
    });
    sim.client("client", async {
        let error = SimNet::default()
            .connect(server_addr())
            .await
            .expect_err("nothing listens");

        assert_eq!(error.kind(), io::ErrorKind::ConnectionRefused);
        Ok(())
    });

    sim.run().unwrap();
}

#[test]
fn sim_net_connect_to_crashed_host_times_out() {
    let mut sim = sim();
    sim.host("server", || async {
        let mut listener = SimNet::default().bind(any(PORT)).await?;
        let _ = listener.accept().await;
        Ok(())
    });
    sim.crash("server");
    sim.client("client", async {
        let net = SimNet {
            syn_timeout: Duration::from_secs(2),
        };

        let error = net
            .connect(server_addr())
            .await
            .expect_err("the SYN is never answered");

        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        Ok(())
    });

    sim.run().unwrap();
}

/// Unlike real TCP, turmoil drops the SYN at a partition together with its
/// reply channel, which reads as a refusal.
#[test]
fn sim_net_connect_across_partition_is_refused() {
    let mut sim = sim();
    sim.host("server", || async {
        let mut listener = SimNet::default().bind(any(PORT)).await?;
        let _ = listener.accept().await;
        Ok(())
    });
    sim.client("client", async {
        turmoil::partition("client", "server");

        let error = SimNet::default()
            .connect(server_addr())
            .await
            .expect_err("the SYN is dropped");

        assert_eq!(error.kind(), io::ErrorKind::ConnectionRefused);
        Ok(())
    });

    sim.run().unwrap();
}

#[test]
fn sim_net_read_after_peer_exit_ends_or_resets() {
    let mut sim = sim();
    sim.host("server", || async {
        let mut listener = SimNet::default().bind(any(PORT)).await?;
        let (stream, _peer) = listener.accept().await?;
        drop(stream);
        std::future::pending::<()>().await;
        Ok(())
    });
    sim.client("client", async {
        let mut stream = SimNet::default().connect(server_addr()).await?;
        let mut buf = [0u8; 4];

        match stream.read(&mut buf).await {
            Ok(0) => {}
            Ok(n) => panic!("read {n} bytes from a closed stream"),
            Err(error) => assert_eq!(error.kind(), io::ErrorKind::ConnectionReset),
        }
        Ok(())
    });

    sim.run().unwrap();
}

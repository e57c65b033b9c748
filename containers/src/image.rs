//! The sshd node image, built locally with debootstrap because the engine
//! has no registry to pull from.
//!
//! The tag is `ringleader-sshd:<hash>`, where the hash covers everything that
//! shapes the image: suite, package list, the files written into the root
//! file system and the image settings. A machine therefore builds each recipe
//! once. The mirror is not hashed: any mirror of a suite gives the same image.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

use crate::apt_source::AptSource;
use crate::engine::Engine;
use crate::error::{Error, Result};

/// Repository part of the image tag.
pub const IMAGE_REPOSITORY: &str = "ringleader-sshd";

/// Label set on the image and on every container and network we create.
pub const MANAGED_LABEL: &str = "org.ringleader.managed";

/// Packages added to debootstrap's minimal base. python3 serves virtualenvs
/// made from the host's system Python, which then need only their own
/// directory mounted. The shared libraries are what a pyenv CPython and the
/// MLX wheels link against, so a mounted pyenv installation runs too.
const PACKAGES: &[&str] = &[
    "openssh-server",
    "procps",
    "iproute2",
    "python3",
    "libssl3",
    "libffi8",
    "libbz2-1.0",
    "liblzma5",
    "zlib1g",
    "libstdc++6",
];

/// Path of the start script inside the image.
pub(crate) const START_SCRIPT: &str = "/usr/local/sbin/ringleader-node-start";

/// Line the start script prints once sshd listens.
pub(crate) const READY_LINE: &str = "ringleader-node: sshd ready";

/// Environment variable carrying the one client public key sshd accepts.
pub(crate) const AUTHORIZED_KEY_ENV: &str = "RINGLEADER_AUTHORIZED_KEY";

const SSHD_CONFIG: &str = "\
# sshd for ringleader rehearsal nodes: root logs in with the test key only.
Port 22
HostKey /etc/ssh/ssh_host_ed25519_key
PermitRootLogin prohibit-password
PubkeyAuthentication yes
AuthorizedKeysFile /etc/ssh/ringleader_authorized_keys
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
UseDNS no
PrintMotd no
# Many ranks on one node open their sessions at the same moment; the default
# of 10 pending connections drops some of them.
MaxStartups 512
MaxSessions 512
Subsystem sftp /usr/lib/openssh/sftp-server
";

/// Runs under docker-init (tini), so sshd is not PID 1 and can be stopped
/// alone while the container keeps running.
const START_SCRIPT_TEXT: &str = r#"#!/bin/sh
# Start one ringleader rehearsal node: a host key kept across restarts, the
# test client key from the environment, sshd in the background.
set -eu
if [ ! -s /etc/ssh/ssh_host_ed25519_key ]; then
    ssh-keygen -q -t ed25519 -N '' -f /etc/ssh/ssh_host_ed25519_key
fi
umask 077
printf '%s\n' "${RINGLEADER_AUTHORIZED_KEY:?the client public key is missing}" > /etc/ssh/ringleader_authorized_keys
mkdir -p /run/sshd
rm -f /run/sshd.pid
/usr/sbin/sshd
while [ ! -s /run/sshd.pid ]; do sleep 0.05; done
echo "ringleader-node: sshd ready"
exec sleep infinity
"#;

/// Directories dropped from the root file system to keep the image small.
const PRUNED_DIRS: &[&str] = &[
    "var/cache/apt/archives",
    "var/lib/apt/lists",
    "usr/share/doc",
    "usr/share/man",
    "usr/share/locale",
    "usr/share/info",
];

/// Everything that determines the image contents.
#[derive(Debug, Clone)]
pub struct ImageRecipe {
    pub suite: String,
    pub packages: Vec<String>,
    /// Files written into the root file system: path, mode, contents.
    pub files: Vec<(String, u32, String)>,
    /// `docker import --change` instructions.
    pub changes: Vec<String>,
}

impl ImageRecipe {
    /// Returns the recipe for `suite`.
    pub fn for_suite(suite: &str) -> ImageRecipe {
        ImageRecipe {
            suite: suite.to_string(),
            packages: PACKAGES.iter().map(|name| name.to_string()).collect(),
            files: vec![
                ("etc/ssh/sshd_config".into(), 0o644, SSHD_CONFIG.into()),
                (START_SCRIPT.trim_start_matches('/').into(), 0o755, START_SCRIPT_TEXT.into()),
            ],
            changes: vec![
                format!(r#"CMD ["{START_SCRIPT}"]"#),
                "EXPOSE 22/tcp".into(),
                format!("LABEL {MANAGED_LABEL}=true"),
            ],
        }
    }

    /// The tag `ringleader-sshd:<first 12 hex digits of the recipe hash>`.
    pub fn tag(&self) -> String {
        let mut hasher = Sha256::new();
        hasher.update(b"ringleader-sshd recipe 1\n");
        hasher.update(format!("suite {}\n", self.suite));
        for package in &self.packages {
            hasher.update(format!("package {package}\n"));
        }
        for (path, mode, contents) in &self.files {
            hasher.update(format!("file {path} {mode:o} {}\n", contents.len()));
            hasher.update(contents.as_bytes());
        }
        for change in &self.changes {
            hasher.update(format!("change {change}\n"));
        }
        let digest = hasher.finalize();
        let hex: String = digest.iter().take(6).map(|byte| format!("{byte:02x}")).collect();
        format!("{IMAGE_REPOSITORY}:{hex}")
    }
}

/// Where builds keep their lock file and temporary root file systems.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("RINGLEADER_CACHE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp/ringleader"))
}

/// Return the tag of the node image, building it first when the engine does
/// not have it. Progress goes to stderr because a build takes about a minute.
pub async fn ensure_image(engine: &Engine) -> Result<String> {
    let source = AptSource::detect()?;
    let recipe = ImageRecipe::for_suite(&source.suite);
    let tag = recipe.tag();
    if image_exists(engine, &tag).await? {
        return Ok(tag);
    }

    // One build per machine at a time: other tests and processes wait here
    // and then find the image.
    let _lock = lock_builds().await?;
    if image_exists(engine, &tag).await? {
        return Ok(tag);
    }
    build_image(&source, &recipe, &tag).await?;
    Ok(tag)
}

/// Whether the engine has `tag`.
pub async fn image_exists(engine: &Engine, tag: &str) -> Result<bool> {
    match engine.docker.inspect_image(tag).await {
        Ok(_) => Ok(true),
        Err(testcontainers::bollard::errors::Error::DockerResponseServerError { status_code: 404, .. }) => Ok(false),
        Err(source) => Err(Error::Docker { action: format!("inspect image {tag}"), source }),
    }
}

async fn lock_builds() -> Result<nix::fcntl::Flock<std::fs::File>> {
    let dir = cache_dir();
    std::fs::create_dir_all(&dir).map_err(Error::file("create cache directory", &dir))?;
    let path = dir.join("image-build.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(Error::file("open lock file", &path))?;
    tokio::task::spawn_blocking(move || {
        nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, errno)| Error::file("lock", path)(errno.into()))
    })
    .await
    .expect("the lock task does not panic")
}

/// Build the image: debootstrap, add our files, import into the engine.
pub async fn build_image(source: &AptSource, recipe: &ImageRecipe, tag: &str) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        return Err(Error::NotRoot);
    }
    require_tool("debootstrap", "install it with `apt-get install -y debootstrap`")?;
    require_tool("docker", "install the Docker command-line client (Debian package docker.io)")?;

    let dir = cache_dir();
    std::fs::create_dir_all(&dir).map_err(Error::file("create cache directory", &dir))?;
    let build_dir = tempfile::Builder::new()
        .prefix("rootfs-")
        .tempdir_in(&dir)
        .map_err(Error::file("create build directory in", &dir))?;
    let rootfs = build_dir.path().join("rootfs");

    eprintln!(
        "building image {tag}: debootstrap {} from {} (about a minute; later runs reuse the image)",
        recipe.suite, source.mirror
    );
    run_debootstrap(source, recipe, &rootfs).await?;
    customize_rootfs(recipe, &rootfs)?;
    eprintln!("building image {tag}: importing the root file system into Docker");
    import_rootfs(recipe, &rootfs, tag).await?;
    eprintln!("building image {tag}: done");

    // The temporary directory holds a full root file system with device
    // nodes; remove it explicitly so a failure is reported, not ignored.
    let path = build_dir.path().to_path_buf();
    build_dir.close().map_err(Error::file("remove build directory", path))?;
    Ok(())
}

fn require_tool(program: &str, hint: &str) -> Result<()> {
    let found = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
        .unwrap_or(false);
    if found {
        Ok(())
    } else {
        Err(Error::MissingTool { program: program.into(), hint: hint.into() })
    }
}

async fn run_debootstrap(source: &AptSource, recipe: &ImageRecipe, rootfs: &Path) -> Result<()> {
    let mut command = Command::new("debootstrap");
    command
        .arg("--variant=minbase")
        .arg(format!("--include={}", recipe.packages.join(",")));
    if let Some(keyring) = &source.keyring {
        command.arg(format!("--keyring={}", keyring.display()));
    }
    command
        .arg(&recipe.suite)
        .arg(rootfs)
        .arg(&source.mirror)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let printable = format!("{:?}", command.as_std());

    let mut child = command.spawn().map_err(|source| Error::Spawn { command: printable.clone(), source })?;
    let stdout = child.stdout.take().expect("stdout is piped");
    let stderr = child.stderr.take().expect("stderr is piped");

    // debootstrap prints one `I: <verb> <package>` line per step; show the
    // first line of each phase with the step count, and keep stderr for the
    // error message.
    let progress = async {
        let mut lines = BufReader::new(stdout).lines();
        let mut steps = 0usize;
        let mut phase = String::new();
        while let Ok(Some(line)) = lines.next_line().await {
            steps += 1;
            let verb = line.split_whitespace().nth(1).unwrap_or_default().to_string();
            if verb != phase && verb != "Validating" {
                eprintln!("  [step {steps:>3}] {line}");
                phase = verb;
            }
        }
    };
    let errors = async {
        let mut text = String::new();
        let mut lines = BufReader::new(stderr).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            text.push_str(&line);
            text.push('\n');
        }
        text
    };
    let ((), errors) = tokio::join!(progress, errors);
    let status = child.wait().await.map_err(|source| Error::Spawn { command: printable.clone(), source })?;
    if !status.success() {
        let log = rootfs.join("debootstrap/debootstrap.log");
        let tail = std::fs::read_to_string(&log).unwrap_or_default();
        let tail: Vec<&str> = tail.lines().rev().take(20).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        return Err(Error::CommandFailed {
            command: printable,
            status: status.to_string(),
            output: format!("\n{errors}{}", tail.join("\n")),
        });
    }
    Ok(())
}

fn customize_rootfs(recipe: &ImageRecipe, rootfs: &Path) -> Result<()> {
    for (relative, mode, contents) in &recipe.files {
        let path = rootfs.join(relative);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(Error::file("create directory", parent))?;
        }
        std::fs::write(&path, contents).map_err(Error::file("write", &path))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(*mode)).map_err(Error::file("chmod", &path))?;
    }

    // Each container makes its own host key at first start.
    let ssh_dir = rootfs.join("etc/ssh");
    let entries = std::fs::read_dir(&ssh_dir).map_err(Error::file("list", &ssh_dir))?;
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with("ssh_host_") {
            std::fs::remove_file(entry.path()).map_err(Error::file("remove", entry.path()))?;
        }
    }

    for relative in PRUNED_DIRS {
        let dir = rootfs.join(relative);
        if dir.is_dir() {
            std::fs::remove_dir_all(&dir).map_err(Error::file("remove", &dir))?;
            std::fs::create_dir_all(&dir).map_err(Error::file("create directory", &dir))?;
        }
    }
    let run_sshd = rootfs.join("run/sshd");
    std::fs::create_dir_all(&run_sshd).map_err(Error::file("create directory", &run_sshd))?;
    Ok(())
}

async fn import_rootfs(recipe: &ImageRecipe, rootfs: &Path, tag: &str) -> Result<()> {
    let mut tar = Command::new("tar");
    tar.arg("--numeric-owner")
        .arg("-C")
        .arg(rootfs)
        .arg("-cf")
        .arg("-")
        .arg(".")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let tar_printable = format!("{:?}", tar.as_std());
    let mut tar_child = tar
        .spawn()
        .map_err(|source| Error::Spawn { command: tar_printable.clone(), source })?;
    let archive: Stdio = tar_child
        .stdout
        .take()
        .expect("stdout is piped")
        .try_into()
        .map_err(|source| Error::Spawn { command: tar_printable.clone(), source })?;

    let mut import = Command::new("docker");
    import.arg("import");
    for change in &recipe.changes {
        import.arg("--change").arg(change);
    }
    import.arg("-").arg(tag).stdin(archive);
    let import_printable = format!("{:?}", import.as_std());
    let imported = import
        .output()
        .await
        .map_err(|source| Error::Spawn { command: import_printable.clone(), source })?;
    let archived = tar_child
        .wait_with_output()
        .await
        .map_err(|source| Error::Spawn { command: tar_printable.clone(), source })?;

    if !archived.status.success() {
        return Err(Error::CommandFailed {
            command: tar_printable,
            status: archived.status.to_string(),
            output: format!(": {}", String::from_utf8_lossy(&archived.stderr).trim()),
        });
    }
    if !imported.status.success() {
        return Err(Error::CommandFailed {
            command: import_printable,
            status: imported.status.to_string(),
            output: format!(": {}", String::from_utf8_lossy(&imported.stderr).trim()),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tag_is_stable_for_a_recipe() {
        let recipe = ImageRecipe::for_suite("bookworm");
        assert_eq!(recipe.tag(), ImageRecipe::for_suite("bookworm").tag());
        assert!(recipe.tag().starts_with("ringleader-sshd:"));
    }

    #[test]
    fn tag_changes_with_suite_and_files() {
        let bookworm = ImageRecipe::for_suite("bookworm");
        assert_ne!(bookworm.tag(), ImageRecipe::for_suite("trixie").tag());

        let mut edited = bookworm.clone();
        edited.files[0].2.push_str("LogLevel DEBUG\n");
        assert_ne!(bookworm.tag(), edited.tag());
    }
}

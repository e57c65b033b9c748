//! Host paths a node needs to run host-built programs and Python.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Returns the paths to bind-mount so the Python at `python` runs inside a node.
///
/// `python` is a virtualenv directory or an interpreter in one. A virtualenv
/// needs its own directory plus the base installation named by `home` in its
/// `pyvenv.cfg`, because its `bin/python3` is a symlink into that base. The
/// distribution's own Python is already in the image. A plain interpreter
/// needs its installation prefix. The node runs the host's Debian suite, so
/// interpreters and wheels built on the host find the same glibc and shared
/// libraries there.
pub fn python_mounts(python: &Path) -> Result<Vec<PathBuf>> {
    let python = std::path::absolute(python).map_err(Error::file("resolve", python))?;
    let venv = if python.is_dir() {
        python.clone()
    } else {
        // <venv>/bin/python3 -> <venv>
        python.parent().and_then(Path::parent).map(Path::to_path_buf).unwrap_or_default()
    };

    let config = venv.join("pyvenv.cfg");
    if let Ok(text) = std::fs::read_to_string(&config) {
        let venv = std::fs::canonicalize(&venv).map_err(Error::file("resolve", &venv))?;
        let mut mounts = vec![venv];
        if let Some(home) = pyvenv_home(&text) {
            mounts.extend(mountable_prefix(install_prefix(&home)));
        }
        return Ok(mounts);
    }

    let interpreter = std::fs::canonicalize(&python).map_err(Error::file("resolve", &python))?;
    let bin = interpreter.parent().unwrap_or(Path::new("/"));
    Ok(mountable_prefix(install_prefix(bin)).into_iter().collect())
}

/// Returns `prefix` unless it is a system directory of the node itself.
///
/// A Python under `/usr` is the distribution's, and the node image has the
/// same suite's `python3`; mounting the host's `/usr` would replace the
/// node's whole userland. `/usr/local` and `/` are skipped for the same
/// reason.
// NOTE: a Python installed directly under /usr/local (not in a
// subdirectory) is therefore not available in the nodes.
fn mountable_prefix(prefix: PathBuf) -> Option<PathBuf> {
    let system = [Path::new("/"), Path::new("/usr"), Path::new("/usr/local")];
    (!system.contains(&prefix.as_path())).then_some(prefix)
}

/// Returns the `home` value of a `pyvenv.cfg`, the base interpreter's `bin` directory.
fn pyvenv_home(text: &str) -> Option<PathBuf> {
    text.lines().find_map(|line| {
        let (key, value) = line.split_once('=')?;
        (key.trim() == "home").then(|| PathBuf::from(value.trim()))
    })
}

/// `<prefix>/bin` -> `<prefix>`, resolving symlinks first.
fn install_prefix(bin: &Path) -> PathBuf {
    let bin = std::fs::canonicalize(bin).unwrap_or_else(|_| bin.to_path_buf());
    bin.parent().map(Path::to_path_buf).unwrap_or(bin)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pyvenv_home_is_read() {
        let text = "home = /opt/python/3.11.7/bin\ninclude-system-site-packages = false\n";
        assert_eq!(pyvenv_home(text), Some(PathBuf::from("/opt/python/3.11.7/bin")));
    }

    #[test]
    fn system_prefixes_are_not_mounted() {
        assert_eq!(mountable_prefix(PathBuf::from("/usr")), None);
        assert_eq!(mountable_prefix(PathBuf::from("/usr/local")), None);
        assert_eq!(mountable_prefix(PathBuf::from("/")), None);
        assert_eq!(
            mountable_prefix(PathBuf::from("/root/.pyenv/versions/3.11.7")),
            Some(PathBuf::from("/root/.pyenv/versions/3.11.7"))
        );
    }

    #[test]
    fn venv_mounts_include_the_base_installation() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base");
        std::fs::create_dir_all(base.join("bin")).unwrap();
        let venv = dir.path().join("venv");
        std::fs::create_dir_all(venv.join("bin")).unwrap();
        std::fs::write(venv.join("pyvenv.cfg"), format!("home = {}\n", base.join("bin").display())).unwrap();

        let mounts = python_mounts(&venv.join("bin/python3")).unwrap();
        assert_eq!(mounts, vec![std::fs::canonicalize(&venv).unwrap(), std::fs::canonicalize(&base).unwrap()]);
    }
}

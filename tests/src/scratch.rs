//! Private temporary directories for test runs, removed on drop; owned by the
//! lb-tests harness and used by [`crate::etcd`] (etcd's data and log) and by tests
//! that need files, such as the certificates of [`crate::certs`].
//!
//! A [`ScratchDir`] is `$TMPDIR/<unique prefix>-<tag>` with mode 0700, named like the
//! harness's namespaces ([`crate::netns::unique_prefix`]), so that the directories
//! of a run that died without cleaning up (SIGKILL, or the SIGINT/SIGTERM cleanup,
//! which exits without running destructors) are recognised by the process id in
//! their name and removed by the next run ([`sweep_stale`]).

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Once;

use anyhow::{Context, Result, ensure};

use crate::netns::{creator_pid, unique_prefix};

/// A fresh private directory under the system's temporary directory, removed with
/// everything in it when dropped.
#[derive(Debug)]
pub struct ScratchDir {
    path: PathBuf,
}

impl ScratchDir {
    /// Creates `$TMPDIR/<unique prefix>-<tag>` with mode 0700. `tag` is a short
    /// name for people reading the directory listing (`etcd`, `certs`): lowercase
    /// ASCII letters, digits and dashes.
    ///
    /// The first call in a process sweeps the directories of dead runs first.
    pub fn new(tag: &str) -> Result<ScratchDir> {
        ensure!(
            !tag.is_empty()
                && tag
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'),
            "a scratch directory tag is lowercase letters, digits or dashes, not {tag:?}"
        );
        static SWEEP: Once = Once::new();
        SWEEP.call_once(|| {
            let removed = sweep_stale();
            if !removed.is_empty() {
                eprintln!("lb-tests: removed stale scratch directories {removed:?}");
            }
        });
        let path = std::env::temp_dir().join(format!("{}-{tag}", unique_prefix()));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        Ok(ScratchDir { path })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `name` inside the directory.
    pub fn join(&self, name: impl AsRef<Path>) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            eprintln!("lb-tests: cannot remove {}: {e}", self.path.display());
        }
    }
}

/// The tags of scratch directories this module creates and sweeps; the agent's
/// `-lb` configuration directories belong to [`crate::spread`] and the testbed.
fn is_scratch_name(name: &str) -> bool {
    let Some((_, tag)) = name.rsplit_once('-') else {
        return false;
    };
    tag != "lb" && creator_pid(name).is_some()
}

/// Removes the scratch directories of runs whose process is gone, and returns their
/// paths. A directory carrying this process's id is left alone: this process may
/// still use it.
pub fn sweep_stale() -> Vec<PathBuf> {
    let own_pid = std::process::id();
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !is_scratch_name(&name) || !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let Some(pid) = creator_pid(&name) else {
            continue;
        };
        if pid == own_pid || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        if std::fs::remove_dir_all(entry.path()).is_ok() {
            removed.push(entry.path());
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scratch_dirs_are_private_unique_and_removed() {
        use std::os::unix::fs::PermissionsExt;
        let a = ScratchDir::new("unit").unwrap();
        let b = ScratchDir::new("unit").unwrap();
        assert_ne!(a.path(), b.path());
        let mode = std::fs::metadata(a.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        std::fs::write(a.join("file"), "x").unwrap();
        let path = a.path().to_owned();
        drop(a);
        assert!(!path.exists());
        assert!(ScratchDir::new("Bad/tag").is_err());
        assert!(is_scratch_name(
            b.path().file_name().unwrap().to_str().unwrap()
        ));
        assert!(!is_scratch_name("lbt1a2b-0-lb"));
        assert!(!is_scratch_name("other-dir"));
    }

    #[test]
    fn directories_of_dead_runs_are_swept() {
        // Made first, so that the sweep of the process's first scratch directory is
        // over before the stale one exists.
        let live = ScratchDir::new("unit").unwrap();
        // Above the kernel's largest pid_max (2^22), so no such process exists.
        let dead = crate::netns::creator_pid("lbt2hwch-0").unwrap();
        assert_eq!(dead, 4_194_305);
        let stale = std::env::temp_dir().join("lbt2hwch-0-etcd");
        std::fs::create_dir_all(stale.join("data")).unwrap();
        let removed = sweep_stale();
        assert!(removed.contains(&stale), "{removed:?}");
        assert!(!stale.exists());
        assert!(live.path().exists());
    }
}

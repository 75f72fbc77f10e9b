//! The CLI's GPU plumbing (cargo feature `gpu`, on by default for the CLI): which device a command runs on,
//! opening the preferred adapter and describing it (shared with the demo and bench in `lowbit_testkit::gpu`).

use crate::error::CliError;

/// Where `forward` and `bench` run the layer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Device {
    /// The fused CPU kernels (best instruction set, rayon threads).
    #[default]
    Cpu,
    /// The fused WGSL kernels on the preferred GPU adapter (wgpu: Vulkan, Metal, DX12, GL).
    Gpu,
}

impl From<Device> for lowbit_testkit::bench::Device {
    fn from(d: Device) -> Self {
        match d {
            Device::Cpu => Self::Cpu,
            Device::Gpu => Self::Gpu,
        }
    }
}

#[cfg(feature = "gpu")]
pub use lowbit_testkit::gpu::describe;

/// The preferred adapter for `--device gpu`; no adapter is an error.
#[cfg(feature = "gpu")]
pub fn open() -> Result<lowbit::gpu::GpuContext, CliError> {
    Ok(lowbit_testkit::gpu::open()?)
}

#[cfg(not(feature = "gpu"))]
/// The error of `--device gpu` in a build without the `gpu` feature.
pub fn not_built() -> CliError {
    CliError::new("--device gpu: this lowbit was built without the `gpu` feature")
}

/// Name of the variable Wayland's client library reads; unset (as under `sudo`, `ssh`, containers and CI) it
/// prints `error: XDG_RUNTIME_DIR is invalid or not set in the environment.` when a GPU driver probes for a
/// display, a line that looks like lowbit's own error.
const RUNTIME_DIR_VAR: &str = "XDG_RUNTIME_DIR";

/// A private runtime directory (mode 0700, under the temporary directory) that `XDG_RUNTIME_DIR` points at for
/// the life of the command when it was unset or invalid; removed on drop.
pub struct RuntimeDir(Option<std::path::PathBuf>);

impl RuntimeDir {
    /// When `needed` (the command may open a GPU adapter) and `XDG_RUNTIME_DIR` is unset or not an absolute
    /// path to an existing directory, creates a private directory and points the variable at it, so that
    /// drivers probing for a display stay quiet. Call it before any thread starts (it sets an environment
    /// variable). Does nothing when the directory cannot be created (the driver's line may then appear).
    pub fn prepare(needed: bool) -> RuntimeDir {
        if !needed || std::env::var_os(RUNTIME_DIR_VAR).is_some_and(|d| is_usable(std::path::Path::new(&d))) {
            return RuntimeDir(None);
        }
        for attempt in 0..8 {
            let dir = std::env::temp_dir().join(format!("lowbit-runtime-{}-{attempt}", std::process::id()));
            if create_private_dir(&dir).is_ok() {
                std::env::set_var(RUNTIME_DIR_VAR, &dir);
                return RuntimeDir(Some(dir));
            }
        }
        RuntimeDir(None)
    }
}

impl Drop for RuntimeDir {
    fn drop(&mut self) {
        if let Some(dir) = &self.0 {
            // Only removes it if nothing was left in it; a leftover socket keeps it (harmless, private).
            let _ = std::fs::remove_dir(dir);
        }
    }
}

fn is_usable(dir: &std::path::Path) -> bool {
    dir.is_absolute() && dir.is_dir()
}

#[cfg(unix)]
fn create_private_dir(dir: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().mode(0o700).create(dir)
}

#[cfg(not(unix))]
fn create_private_dir(dir: &std::path::Path) -> std::io::Result<()> {
    std::fs::create_dir(dir)
}

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

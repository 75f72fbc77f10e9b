//! The GPU context: instance, adapter, device, queue, the optional features in use, and the pipeline cache.

use super::layout::{self, BindingSet};
use super::shader::{KernelKey, KernelOp};
use crate::Error;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// How to choose and open the adapter. `Default` = all backends (honouring `WGPU_BACKEND`), prefer a
/// discrete GPU, use every optional feature the adapter has.
#[derive(Clone, Debug)]
pub struct ContextOptions {
    /// Backends to search (`None`: all, or what the `WGPU_BACKEND` environment variable names).
    pub backends: Option<wgpu::Backends>,
    /// Pick the first adapter whose name contains this (case-insensitive) instead of the preferred one.
    pub adapter_name: Option<String>,
    /// Use `shader-f16` kernels when the adapter has the feature.
    pub allow_f16: bool,
    /// Use subgroup kernels when the adapter has the feature.
    pub allow_subgroups: bool,
    /// Request timestamp queries when the adapter has them.
    pub allow_timestamps: bool,
}

impl Default for ContextOptions {
    fn default() -> Self {
        ContextOptions {
            backends: None,
            adapter_name: None,
            allow_f16: true,
            allow_subgroups: true,
            allow_timestamps: true,
        }
    }
}

/// Optional features enabled on the device (each only if the adapter has it and the options allow it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GpuFeatures {
    /// `shader-f16`: f16 GEMM variants available.
    pub f16: bool,
    /// `subgroups`: subgroup-reduction GEMV variants available.
    pub subgroups: bool,
    /// Timestamp queries: [`GpuLinear::time_forward`](super::GpuLinear::time_forward) reports kernel time.
    pub timestamps: bool,
}

/// An open GPU device plus lowbit's pipeline cache. Cheap to share by reference; all methods take `&self`.
pub struct GpuContext {
    adapter: wgpu::Adapter,
    pub(crate) device: wgpu::Device,
    pub(crate) queue: wgpu::Queue,
    info: wgpu::AdapterInfo,
    features: GpuFeatures,
    pub(crate) limits: wgpu::Limits,
    /// The bind group layouts, one per [`BindingSet`] (in [`BindingSet::ALL`] order): every forward kernel
    /// shares the first, so a forward's bind groups fit every forward variant.
    bind_layouts: Vec<wgpu::BindGroupLayout>,
    pipeline_layouts: Vec<wgpu::PipelineLayout>,
    pipelines: Mutex<HashMap<KernelKey, Arc<wgpu::ComputePipeline>>>,
}

impl std::fmt::Debug for GpuContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuContext").field("adapter", &self.info.name).field("features", &self.features).finish()
    }
}

#[cfg_attr(target_arch = "wasm32", allow(dead_code))]
fn rank(t: wgpu::DeviceType) -> u8 {
    match t {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Cpu => 3,
        wgpu::DeviceType::Other => 4,
    }
}

impl GpuContext {
    /// Opens the preferred adapter (discrete > integrated > virtual > CPU) with default options.
    /// Errors with [`Error::NoGpuAdapter`] when there is none, [`Error::Gpu`] when the adapter refuses to
    /// open a device.
    pub async fn new() -> Result<GpuContext, Error> {
        Self::with_options(&ContextOptions::default()).await
    }

    /// Blocking [`new`](Self::new) for native callers.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn new_blocking() -> Result<GpuContext, Error> {
        pollster::block_on(Self::new())
    }

    /// Blocking [`with_options`](Self::with_options) for native callers.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn with_options_blocking(opts: &ContextOptions) -> Result<GpuContext, Error> {
        pollster::block_on(Self::with_options(opts))
    }

    /// Names of all adapters visible on `backends` (`None`: all / `WGPU_BACKEND`), as "name (backend, type)".
    #[cfg(not(target_arch = "wasm32"))]
    pub async fn list_adapters(backends: Option<wgpu::Backends>) -> Vec<String> {
        let (instance, backends) = Self::instance(backends);
        instance
            .enumerate_adapters(backends)
            .await
            .iter()
            .map(|a| {
                let i = a.get_info();
                format!("{} ({:?}, {:?})", i.name, i.backend, i.device_type)
            })
            .collect()
    }

    fn instance(backends: Option<wgpu::Backends>) -> (wgpu::Instance, wgpu::Backends) {
        let mut desc = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
        let backends = backends.unwrap_or_else(|| wgpu::Backends::all().with_env());
        desc.backends = backends;
        (wgpu::Instance::new(desc), backends)
    }

    /// Opens an adapter chosen by `opts`. Requests only the WebGPU default limits (clamped to what the
    /// adapter offers), and `SHADER_F16` / `SUBGROUP` / `TIMESTAMP_QUERY` only when present and allowed.
    pub async fn with_options(opts: &ContextOptions) -> Result<GpuContext, Error> {
        #[cfg_attr(target_arch = "wasm32", allow(unused_variables))]
        let (instance, backends) = Self::instance(opts.backends);
        #[cfg(not(target_arch = "wasm32"))]
        let adapter = {
            let mut all = instance.enumerate_adapters(backends).await;
            let names: Vec<String> = all.iter().map(|a| a.get_info().name).collect();
            match &opts.adapter_name {
                Some(want) => {
                    let w = want.to_lowercase();
                    let i = all.iter().position(|a| a.get_info().name.to_lowercase().contains(&w));
                    match i {
                        Some(i) => all.swap_remove(i),
                        None => {
                            return Err(Error::NoGpuAdapter {
                                detail: format!("none named like {want:?} on {backends:?} (found {names:?})"),
                            })
                        }
                    }
                }
                None => {
                    all.sort_by_key(|a| rank(a.get_info().device_type));
                    if all.is_empty() {
                        return Err(Error::NoGpuAdapter {
                            detail: format!(
                                "wgpu found no adapter on backends {backends:?} (install a GPU driver, or \
                                 lavapipe: apt-get install mesa-vulkan-drivers libvulkan1)"
                            ),
                        });
                    }
                    all.swap_remove(0)
                }
            }
        };
        #[cfg(target_arch = "wasm32")]
        let adapter = instance
            .request_adapter(&wgpu::RequestAdapterOptions {
                power_preference: wgpu::PowerPreference::HighPerformance,
                force_fallback_adapter: false,
                compatible_surface: None,
                // wgpu 30.0.2 added this field; the browser path must name it to compile for wasm32.
                apply_limit_buckets: false,
            })
            .await
            .map_err(|e| Error::NoGpuAdapter { detail: format!("requestAdapter failed: {e}") })?;

        let have = adapter.features();
        let mut want = wgpu::Features::empty();
        let f16 = opts.allow_f16 && have.contains(wgpu::Features::SHADER_F16);
        let subgroups = opts.allow_subgroups && have.contains(wgpu::Features::SUBGROUP);
        let timestamps = opts.allow_timestamps && have.contains(wgpu::Features::TIMESTAMP_QUERY);
        if f16 {
            want |= wgpu::Features::SHADER_F16;
        }
        if subgroups {
            want |= wgpu::Features::SUBGROUP;
        }
        if timestamps {
            want |= wgpu::Features::TIMESTAMP_QUERY;
        }
        let limits = wgpu::Limits::default().or_worse_values_from(&adapter.limits());
        let (device, queue) = adapter
            .request_device(&wgpu::DeviceDescriptor {
                label: Some("lowbit"),
                required_features: want,
                required_limits: limits.clone(),
                experimental_features: wgpu::ExperimentalFeatures::disabled(),
                memory_hints: wgpu::MemoryHints::Performance,
                trace: wgpu::Trace::Off,
            })
            .await
            .map_err(|e| Error::gpu(format!("request device from {}", adapter.get_info().name), e))?;
        let info = adapter.get_info();
        let bind_layouts: Vec<wgpu::BindGroupLayout> = BindingSet::ALL
            .iter()
            .map(|&set| {
                device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
                    label: Some("lowbit kernels"),
                    entries: &layout::layout_entries(set),
                })
            })
            .collect();
        let pipeline_layouts = bind_layouts
            .iter()
            .map(|bl| {
                device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                    label: Some("lowbit kernels"),
                    bind_group_layouts: &[Some(bl)],
                    immediate_size: 0,
                })
            })
            .collect();
        Ok(GpuContext {
            adapter,
            device,
            queue,
            info,
            features: GpuFeatures { f16, subgroups, timestamps },
            limits,
            bind_layouts,
            pipeline_layouts,
            pipelines: Mutex::new(HashMap::new()),
        })
    }

    /// The adapter's name (e.g. `"NVIDIA H100"`, `"llvmpipe (LLVM 15.0.6, 256 bits)"`).
    pub fn adapter_name(&self) -> &str {
        &self.info.name
    }
    /// Full adapter information (backend, device type, driver).
    pub fn adapter_info(&self) -> &wgpu::AdapterInfo {
        &self.info
    }
    /// The underlying adapter.
    pub fn adapter(&self) -> &wgpu::Adapter {
        &self.adapter
    }
    /// The device (for callers that add their own work).
    pub fn device(&self) -> &wgpu::Device {
        &self.device
    }
    /// The queue.
    pub fn queue(&self) -> &wgpu::Queue {
        &self.queue
    }
    /// Optional features in use.
    pub fn features(&self) -> GpuFeatures {
        self.features
    }
    /// The limits the device was opened with (the WebGPU defaults, or lower where the adapter is lower).
    pub fn limits(&self) -> &wgpu::Limits {
        &self.limits
    }
    /// The bind group layout of `set`.
    pub(crate) fn bind_layout(&self, set: BindingSet) -> &wgpu::BindGroupLayout {
        &self.bind_layouts[set.index()]
    }
    /// Whether this is a CPU adapter (lavapipe, llvmpipe, SwiftShader): fine for correctness, meaningless
    /// for speed.
    pub fn is_cpu_adapter(&self) -> bool {
        self.info.device_type == wgpu::DeviceType::Cpu || self.info.name.to_lowercase().contains("llvmpipe")
    }

    /// Whether the device can run `key` (its optional features are enabled).
    pub fn supports(&self, key: &KernelKey) -> bool {
        (!key.f16 || (self.features.f16 && key.op == KernelOp::Gemm))
            && (!key.subgroups || (self.features.subgroups && key.op == KernelOp::Gemv))
    }

    /// The compiled pipeline of `key`, from the cache or compiled now (once per key and context). Errors
    /// ([`Error::Unsupported`]) when the device lacks the variant's optional feature, ([`Error::Gpu`]) when the
    /// shader fails to compile.
    pub async fn pipeline(&self, key: &KernelKey) -> Result<Arc<wgpu::ComputePipeline>, Error> {
        if let Some(p) = self.lock().get(key) {
            return Ok(p.clone());
        }
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let pipeline = self.compile(key);
        let popped = scope.pop().await;
        self.finish_compile(key, pipeline, popped)
    }

    /// [`pipeline`](Self::pipeline) without `await`, for recording ([`GpuLinear::encode_forward`]). On
    /// native backends compile errors are returned (wgpu-core reports error scopes synchronously). In the
    /// browser the error scope can only be awaited, so a compile error there goes to the device's
    /// uncaptured-error handler instead; [`GpuLinear::prepare`] compiles a forward's pipelines with errors
    /// returned, and the host-slice forwards call it first.
    ///
    /// [`GpuLinear::encode_forward`]: super::GpuLinear::encode_forward
    /// [`GpuLinear::prepare`]: super::GpuLinear::prepare
    pub(crate) fn pipeline_now(&self, key: &KernelKey) -> Result<Arc<wgpu::ComputePipeline>, Error> {
        if let Some(p) = self.lock().get(key) {
            return Ok(p.clone());
        }
        #[cfg(not(target_arch = "wasm32"))]
        {
            let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
            let pipeline = self.compile(key);
            let popped = pollster::block_on(scope.pop());
            self.finish_compile(key, pipeline, popped)
        }
        #[cfg(target_arch = "wasm32")]
        {
            let pipeline = self.compile(key);
            self.finish_compile(key, pipeline, None)
        }
    }

    fn compile(&self, key: &KernelKey) -> Result<wgpu::ComputePipeline, Error> {
        if !self.supports(key) {
            return Err(Error::Unsupported {
                what: format!(
                    "kernel {} on {}: the device lacks its optional feature {:?}",
                    key.name(),
                    self.info.name,
                    key.required_features()
                ),
            });
        }
        let src = key.source()?;
        let module = self.device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some(&key.name()),
            source: wgpu::ShaderSource::Wgsl(src.into()),
        });
        Ok(self.device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(&key.name()),
            layout: Some(&self.pipeline_layouts[key.op.binding_set().index()]),
            module: &module,
            entry_point: Some("main"),
            compilation_options: Default::default(),
            cache: None,
        }))
    }

    fn finish_compile(
        &self,
        key: &KernelKey,
        pipeline: Result<wgpu::ComputePipeline, Error>,
        popped: Option<wgpu::Error>,
    ) -> Result<Arc<wgpu::ComputePipeline>, Error> {
        let pipeline = pipeline?;
        if let Some(e) = popped {
            return Err(Error::gpu(format!("compile shader {}", key.name()), e));
        }
        let p = Arc::new(pipeline);
        self.lock().insert(*key, p.clone());
        Ok(p)
    }

    /// Number of compiled pipelines in the cache.
    pub fn cached_pipelines(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<KernelKey, Arc<wgpu::ComputePipeline>>> {
        match self.pipelines.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }
}

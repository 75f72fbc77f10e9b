//! The WebGPU path: lowbit's `gpu` module (wgpu's browser backend) when built with the `webgpu` feature,
//! otherwise stand-ins that say why WebGPU is unavailable. Call sites never need `cfg`.

use std::cell::RefCell;

use lowbit::linear::QuantLinear;
use wasm_bindgen::JsError;

#[cfg(feature = "webgpu")]
mod imp {
    use std::cell::RefCell;
    use std::rc::Rc;

    use lowbit::gpu::{GpuContext, GpuLinear};
    use lowbit::linear::QuantLinear;
    use wasm_bindgen::JsError;

    /// A layer uploaded to the GPU (packed codes, compressed scales, bias, adapters).
    pub(crate) type GpuLayer = Rc<GpuLinear>;

    thread_local! {
        /// The one device of this page, opened by the first `init`.
        static CTX: RefCell<Option<Rc<GpuContext>>> = const { RefCell::new(None) };
    }

    fn err(e: impl std::fmt::Display) -> JsError {
        JsError::new(&e.to_string())
    }

    pub(crate) async fn context() -> Result<Rc<GpuContext>, JsError> {
        if let Some(c) = CTX.with(|c| c.borrow().clone()) {
            return Ok(c);
        }
        let has_gpu = js_sys::Reflect::get(&js_sys::global(), &"navigator".into())
            .ok()
            .filter(|n| n.is_object())
            .and_then(|n| js_sys::Reflect::get(&n, &"gpu".into()).ok())
            .is_some_and(|g| g.is_object());
        if !has_gpu {
            return Err(JsError::new(
                "WebGPU is not available in this browser (navigator.gpu is missing: an old browser, a page that is \
                 not a secure context, or WebGPU disabled; headless Chromium needs --enable-unsafe-webgpu)",
            ));
        }
        let ctx = Rc::new(GpuContext::new().await.map_err(err)?);
        // Another call may have opened one meanwhile: keep the first.
        Ok(CTX.with(|c| c.borrow_mut().get_or_insert(ctx).clone()))
    }

    pub(crate) async fn init() -> Result<String, JsError> {
        let ctx = context().await?;
        let i = ctx.adapter_info();
        let f = ctx.features();
        Ok(serde_json::json!({
            "name": i.name, "backend": format!("{:?}", i.backend), "type": format!("{:?}", i.device_type),
            "driver": i.driver, "driver_info": i.driver_info,
            "f16": f.f16, "subgroups": f.subgroups, "timestamps": f.timestamps,
        })
        .to_string())
    }

    pub(crate) async fn forward(
        linear: &QuantLinear,
        slot: &RefCell<Option<GpuLayer>>,
        x: &[f32],
        m: usize,
        ids: Option<&[Option<usize>]>,
    ) -> Result<Vec<f32>, JsError> {
        let ctx = context().await?;
        let existing = slot.borrow().clone();
        let g = match existing {
            Some(g) => g,
            None => {
                let g = Rc::new(GpuLinear::upload(&ctx, linear).map_err(err)?);
                *slot.borrow_mut() = Some(g.clone());
                g
            }
        };
        match ids {
            None => g.forward(&ctx, x, m).await.map_err(err),
            Some(ids) => g.forward_batch(&ctx, x, m, ids).await.map_err(err),
        }
    }
}

#[cfg(not(feature = "webgpu"))]
mod imp {
    use std::cell::RefCell;

    use lowbit::linear::QuantLinear;
    use wasm_bindgen::JsError;

    /// Nothing is ever uploaded in a build without WebGPU.
    pub(crate) type GpuLayer = ();

    const WHY: &str = "WebGPU is not available in this build of lowbit-web (built without the `webgpu` feature: \
                       lowbit's GPU module is not part of this build); use device \"cpu\"";

    pub(crate) async fn init() -> Result<String, JsError> {
        Err(JsError::new(WHY))
    }

    pub(crate) async fn forward(
        _: &QuantLinear,
        _: &RefCell<Option<GpuLayer>>,
        _: &[f32],
        _: usize,
        _: Option<&[Option<usize>]>,
    ) -> Result<Vec<f32>, JsError> {
        Err(JsError::new(WHY))
    }
}

#[cfg(feature = "webgpu")]
pub(crate) use imp::context;
pub(crate) use imp::GpuLayer;

/// Opens (once) the page's WebGPU device; JSON adapter info.
pub(crate) async fn init() -> Result<String, JsError> {
    imp::init().await
}

/// `forward` / `forward_batch` of `linear` on the GPU, uploading it into `slot` on first use.
pub(crate) async fn forward(
    linear: &QuantLinear,
    slot: &RefCell<Option<GpuLayer>>,
    x: &[f32],
    m: usize,
    ids: Option<&[Option<usize>]>,
) -> Result<Vec<f32>, JsError> {
    imp::forward(linear, slot, x, m, ids).await
}

//! The WebGPU path of [`crate::Model`]: the whole model resident on the GPU (lowbit-llm's `GpuModel`, one
//! submission and one small readback per token), awaited instead of blocked on. In a build without the
//! `webgpu` feature, a stand-in that says so.

use lowbit_llm::{Model, Sampler};
use wasm_bindgen::JsError;

#[cfg(feature = "webgpu")]
mod imp {
    use std::rc::Rc;

    use lowbit::gpu::GpuContext;
    use lowbit_llm::gpu::GpuModel;
    use lowbit_llm::{Logits, Model, Sampler};
    use wasm_bindgen::JsError;

    use crate::js_err;

    /// The model uploaded to the page's WebGPU device, for sequences of up to `capacity` positions and
    /// forwards of up to `max_batch` tokens.
    pub(crate) struct GpuRunner {
        ctx: Rc<GpuContext>,
        model: GpuModel,
        logits: Vec<f32>,
    }

    impl GpuRunner {
        /// Uploads `model` (weights, adapters, KV cache, scratch), or reuses `slot`'s upload when it is large
        /// enough; the KV cache starts empty either way.
        pub(crate) async fn prepare<'s>(
            slot: &'s mut Option<GpuRunner>,
            model: &Model,
            capacity: usize,
            max_batch: usize,
        ) -> Result<&'s mut GpuRunner, JsError> {
            let fits =
                slot.as_ref().is_some_and(|g| g.model.capacity() >= capacity && g.model.max_batch() >= max_batch);
            if !fits {
                *slot = None; // free the old upload first
                let ctx = crate::webgpu::context().await?;
                // Room for a conversation: uploads are slow, so round the sizes up.
                let capacity = capacity.max(1024).min(model.rope().max_pos());
                let model_gpu = GpuModel::upload(&ctx, model, capacity, max_batch.max(64)).map_err(js_err)?;
                *slot = Some(GpuRunner { ctx, model: model_gpu, logits: vec![0.0; model.config().vocab_size] });
            }
            let g = slot.as_mut().expect("set above");
            g.model.reset();
            Ok(g)
        }

        /// Runs `tokens` and returns the next token: greedy on the GPU (4 bytes read back), or sampled
        /// from the last row's logits.
        pub(crate) async fn next(
            &mut self,
            tokens: &[u32],
            sampler: &mut Sampler,
            greedy: bool,
        ) -> Result<u32, JsError> {
            if greedy {
                return self.model.forward_greedy_async(&self.ctx, tokens).await.map_err(js_err);
            }
            self.model.forward_async(&self.ctx, tokens, Logits::Last, &mut self.logits).await.map_err(js_err)?;
            Ok(sampler.sample(&self.logits))
        }
    }
}

#[cfg(not(feature = "webgpu"))]
mod imp {
    use lowbit_llm::{Model, Sampler};
    use wasm_bindgen::JsError;

    /// Never constructed in a build without WebGPU.
    pub(crate) enum GpuRunner {}

    impl GpuRunner {
        pub(crate) async fn prepare<'s>(
            _: &'s mut Option<GpuRunner>,
            _: &Model,
            _: usize,
            _: usize,
        ) -> Result<&'s mut GpuRunner, JsError> {
            Err(JsError::new(
                "device \"webgpu\": this build of lowbit-web has no WebGPU (built without the `webgpu` feature); \
                 use device \"wasm\"",
            ))
        }

        pub(crate) async fn next(&mut self, _: &[u32], _: &mut Sampler, _: bool) -> Result<u32, JsError> {
            match *self {}
        }
    }
}

pub(crate) use imp::GpuRunner;

/// Where a generation runs: the WASM CPU path with its per-sequence state, or the GPU upload.
pub(crate) enum Runner<'a> {
    Wasm { model: &'a Model, state: Box<lowbit_llm::State>, logits: Vec<f32> },
    Gpu(&'a mut GpuRunner),
}

impl Runner<'_> {
    /// Runs `tokens` (appended to the sequence) and returns the next token.
    pub(crate) async fn next(&mut self, tokens: &[u32], sampler: &mut Sampler, greedy: bool) -> Result<u32, JsError> {
        match self {
            Runner::Wasm { model, state, logits } => {
                model.forward(tokens, state, lowbit_llm::Logits::Last, logits).map_err(crate::js_err)?;
                Ok(sampler.sample(logits))
            }
            Runner::Gpu(g) => g.next(tokens, sampler, greedy).await,
        }
    }
}

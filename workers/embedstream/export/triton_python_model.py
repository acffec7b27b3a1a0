"""Triton Python-backend model: serves ``model.onnx`` (ONNX Runtime) or TorchScript ``model.pt`` beside this file.

Copied verbatim into every exported model version directory; it depends on nothing from
embedstream, only on torch, numpy (and onnxruntime for an ONNX file) in the server's Python environment.
"""

import hashlib
import json
import os
from typing import Any

import numpy as np
import torch
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        torch.set_num_threads(int(params.get("torch_num_threads", "1")))
        if args.get("model_instance_kind") == "GPU":
            self.device = torch.device(f"cuda:{args['model_instance_device_id']}")
        else:
            self.device = torch.device("cpu")
        self.input_names = [t["name"] for t in config["input"]]
        self.output_names = [t["name"] for t in config["output"]]
        onnx_path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        if os.path.exists(onnx_path):
            self.session = _onnx_session(onnx_path, params, self.device)
        else:
            self.session = None
            self._load_torchscript(args, params)
        self._warm_up(config)

    def _load_torchscript(self, args: dict[str, Any], params: dict[str, str]) -> None:
        path = os.path.join(args["model_repository"], args["model_version"], "model.pt")
        # TorchScript's profiling executor re-specialises the graph for every new input shape, and
        # a micro-batcher sends every batch size from 1 to the maximum: its first calls at each size
        # took up to 8x the steady time (MobileNet, batch 1: 193 ms vs 7 ms). Plain execution has
        # no such first calls and ran as fast here.
        set_optimize = getattr(torch._C, "_set_graph_executor_optimize", None)  # private: absent in some torch
        if set_optimize is not None:
            set_optimize(False)
        self.model = torch.jit.load(path, map_location=self.device).eval()
        _check_weights(self.model, params.get("embedstream.spec"), path)

    def _run(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        if self.session is not None:
            return list(self.session.run(None, dict(zip(self.input_names, arrays, strict=True))))
        with torch.inference_mode():
            result = self.model(*[torch.from_numpy(a).to(self.device) for a in arrays])
        return [t.cpu().numpy() for t in (result if isinstance(result, (tuple, list)) else (result,))]

    def _warm_up(self, config: dict[str, Any]) -> None:
        """One call at batch 1 and one at the largest batch before serving: first allocations happen here."""
        dtypes = {"TYPE_UINT8": np.uint8, "TYPE_FP32": np.float32, "TYPE_INT64": np.int64}
        if any(t["data_type"] not in dtypes for t in config["input"]):
            return
        for batch in sorted({1, int(config.get("max_batch_size", 1)) or 1}):
            inputs = [
                np.zeros((batch, *[d if d > 0 else 8 for d in map(int, t["dims"])]), dtype=dtypes[t["data_type"]])
                for t in config["input"]
            ]
            self._run(inputs)

    def execute(self, requests: list[Any]) -> list[Any]:
        # Triton's dynamic batcher hands over several requests at once: run them as one batch.
        per_request = [
            [pb_utils.get_input_tensor_by_name(r, name).as_numpy() for name in self.input_names] for r in requests
        ]
        sizes = [arrays[0].shape[0] for arrays in per_request]
        try:
            stacked = [_concat_padded([arrays[i] for arrays in per_request]) for i in range(len(self.input_names))]
            outs = self._run(stacked)
        except Exception as exc:  # a bad batch fails its requests, never the server
            return [pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{type(exc).__name__}: {exc}"))] * len(
                requests
            )
        responses, start = [], 0
        for n in sizes:
            tensors = [
                pb_utils.Tensor(name, np.ascontiguousarray(out[start : start + n]))
                for name, out in zip(self.output_names, outs, strict=True)
            ]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start += n
        return responses


def _onnx_session(path: str, params: dict[str, str], device: Any) -> Any:
    """ONNX Runtime on the instance's device, after checking the file is the one exported.

    The weights fingerprint in the spec was taken from the torch module the file was exported from;
    the file's sha256, recorded at export, ties this file to that module.
    """
    import onnxruntime

    want = params.get("embedstream.onnx_sha256")
    if want:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        if digest.hexdigest() != want:
            raise RuntimeError(
                f"{path} has sha256 {digest.hexdigest()}, its config says {want}: "
                "the file was replaced after export; export the model again"
            )
    options = onnxruntime.SessionOptions()
    # Same sizing as TorchScript's: instances x threads chosen for the cores at export.
    options.intra_op_num_threads = int(params.get("torch_num_threads", "1"))
    options.inter_op_num_threads = 1
    providers: list[Any] = ["CPUExecutionProvider"]
    if device.type == "cuda":
        providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0}))
    return onnxruntime.InferenceSession(path, sess_options=options, providers=providers)


def _check_weights(model: Any, raw_spec: str | None, path: str) -> None:
    """Refuse to serve a ``model.pt`` that is not the one the spec's weights fingerprint names.

    The worker trusts the fingerprint in the config; a model file swapped after export would otherwise
    be served under the old fingerprint. Same computation as embedstream.lineage.
    """
    want = json.loads(raw_spec).get("weights_sha256") if raw_spec else None
    if not want:
        return  # exported before fingerprints: nothing to hold it to
    digest = hashlib.sha256()
    state = model.state_dict()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        header = json.dumps([name, str(tensor.dtype), list(tensor.shape)], separators=(",", ":"), ensure_ascii=False)
        header_bytes = header.encode()
        digest.update(len(header_bytes).to_bytes(4, "little") + header_bytes)
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    have = digest.hexdigest()[: len(want)]
    if have != want:
        raise RuntimeError(
            f"{path} has weights fingerprint {have}, its config's embedstream.spec says {want}: "
            "the file was replaced after export; export the model again"
        )


def _concat_padded(arrays: list[np.ndarray]) -> np.ndarray:
    """Concatenate along the batch dimension, right-padding every other dimension with zeros to the largest.

    Variable-length inputs (token ids and their mask, dims -1) arrive padded to each request's own
    longest row; zeros past a row's end are masked padding, so the merged batch means the same.
    Fixed-shape inputs (images) all agree already and are concatenated untouched.
    """
    shapes = {a.shape[1:] for a in arrays}
    if len(shapes) == 1:
        return np.concatenate(arrays)
    target = tuple(max(dims) for dims in zip(*shapes, strict=True))
    return np.concatenate(
        [np.pad(a, [(0, 0)] + [(0, t - n) for n, t in zip(a.shape[1:], target, strict=True)]) for a in arrays]
    )

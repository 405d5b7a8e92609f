"""A small OpenAI-compatible completions server for the tests: transformers `generate` on a local model.

    python tests/online/completions_server.py --model DIR --port 8000

Serves GET /v1/models and POST /v1/completions on 127.0.0.1: `prompt` is token ids or a string (tokenized
with special tokens parsed, none added); temperature 0 decodes greedily, otherwise it samples with the
request's temperature, top_p and seed. An answer ends at the first end-of-sequence or padding token, which
counts in usage.completion_tokens, as the transformers backend counts it. One request generates at a time.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


class Server(ThreadingHTTPServer):
    def __init__(self, port: int, model_dir: str) -> None:
        super().__init__(("127.0.0.1", port), Handler)
        self.model_dir = model_dir
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        self.lock = threading.Lock()

    @torch.inference_mode()
    def complete(self, body: dict) -> dict:
        prompt = body["prompt"]
        ids = (
            prompt if isinstance(prompt, list) else self.tokenizer(prompt, add_special_tokens=False).input_ids
        )
        temperature = body.get("temperature", 1.0)
        sampling = {}
        if temperature > 0:
            sampling = dict(temperature=temperature, top_p=body.get("top_p", 1.0), top_k=0)
        with self.lock:  # one generation at a time, from its own seed
            torch.manual_seed(body.get("seed", 0))
            output = self.model.generate(
                input_ids=torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=body["max_tokens"],
                do_sample=bool(sampling),
                pad_token_id=self.tokenizer.pad_token_id,
                **sampling,
            )[0, len(ids) :].tolist()
        stops = {self.tokenizer.eos_token_id, self.tokenizer.pad_token_id}
        end = next((i + 1 for i, token in enumerate(output) if token in stops), len(output))
        stopped = end > 0 and output[end - 1] in stops
        return {
            "object": "text_completion",
            "model": body.get("model"),
            "choices": [
                {
                    "index": 0,
                    "text": self.tokenizer.decode(output[:end], skip_special_tokens=True),
                    "finish_reason": "stop" if stopped else "length",
                }
            ],
            "usage": {"prompt_tokens": len(ids), "completion_tokens": end},
        }


class Handler(BaseHTTPRequestHandler):
    server: Server

    def _send(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path != "/v1/models":
            return self._send(404, {"error": "not found"})
        self._send(200, {"object": "list", "data": [{"id": self.server.model_dir, "object": "model"}]})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path != "/v1/completions":
            return self._send(404, {"error": "not found"})
        if body.get("model") != self.server.model_dir:
            return self._send(404, {"error": f"model {body.get('model')!r} is not served here"})
        self._send(200, self.server.complete(body))

    def log_message(self, *args) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    server = Server(args.port, args.model)
    print(f"serving {args.model} on 127.0.0.1:{args.port}", file=sys.stderr, flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()

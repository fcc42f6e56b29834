"""The baseline: FastAPI with one `generate` call per request, no queue and no batching.

python -m bench.baseline_server <model dir> <port>
"""

import sys

import torch
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel
from transformers import AutoModelForCausalLM, AutoTokenizer


class GenerateBody(BaseModel):
    prompt: str
    max_tokens: int
    ignore_eos: bool = False


def create_app(model_dir: str) -> FastAPI:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    app = FastAPI()

    @app.post("/generate")
    def generate(body: GenerateBody) -> dict:
        inputs = tokenizer(body.prompt, return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(
                **inputs,
                max_new_tokens=body.max_tokens,
                min_new_tokens=body.max_tokens if body.ignore_eos else 0,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id or 0,
            )
        new = out[0, inputs.input_ids.shape[1] :]
        return {"text": tokenizer.decode(new, skip_special_tokens=True), "tokens": len(new)}

    return app


if __name__ == "__main__":
    uvicorn.run(
        create_app(sys.argv[1]), host="127.0.0.1", port=int(sys.argv[2]), log_level="warning"
    )

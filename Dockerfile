# A CUDA-capable PyTorch image with finetune installed. `docker run IMAGE` prints the CLI help;
# `docker run --gpus all -v $PWD:/work IMAGE python -m finetune /work/recipe.yaml` runs a recipe.
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

WORKDIR /opt/finetune
COPY pyproject.toml README.md ./
COPY finetune ./finetune
COPY recipes ./recipes
RUN pip install --no-cache-dir ".[peft]"

CMD ["python", "-m", "finetune", "--help"]

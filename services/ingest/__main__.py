"""``python -m services.ingest``: run the ingest service."""

from services.common.server import main
from services.ingest.module import MODULE

if __name__ == "__main__":
    main(MODULE)

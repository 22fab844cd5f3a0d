"""``python -m services.messaging``."""

from services.common.server import main
from services.messaging.module import MODULE

if __name__ == "__main__":
    main(MODULE)

"""``python -m services.identity``: run the identity service."""

from services.common.server import main
from services.identity.module import MODULE

if __name__ == "__main__":
    main(MODULE)

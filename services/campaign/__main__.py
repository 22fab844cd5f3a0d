"""Run the campaign service: ``python -m services.campaign``."""

from services.campaign.module import MODULE
from services.common.server import main

if __name__ == "__main__":
    main(MODULE)

from shared.runtime.service import run_main

from services.metrics.app import create_service

run_main(create_service)

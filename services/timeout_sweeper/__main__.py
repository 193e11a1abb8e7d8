from shared.runtime.service import run_main

from services.timeout_sweeper.app import create_service

run_main(create_service)

from shared.runtime.service import run_main

from services.team_routing.app import create_service

run_main(create_service)

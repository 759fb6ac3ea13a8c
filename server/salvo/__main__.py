from salvo.cli import main

raise SystemExit(main())

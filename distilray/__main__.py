from distilray.cli import main

raise SystemExit(main())
